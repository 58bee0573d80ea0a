"""The MedMNIST data root that data-dependent tests use is present and well-formed.

CI sets SECURE_ONESHOT_REQUIRE_DATA=1, so a missing root fails here instead of
silently skipping every test that needs data.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import MEDMNIST_ROOT

EXPECTED = {"pneumoniamnist.npz": (4708, 524, 624), "breastmnist.npz": (546, 78, 156)}


@pytest.fixture(scope="module")
def data_root():
    if not MEDMNIST_ROOT.is_dir():
        if os.environ.get("SECURE_ONESHOT_REQUIRE_DATA") == "1":
            pytest.fail(f"MedMNIST data root {MEDMNIST_ROOT} is missing (SECURE_ONESHOT_DATA)")
        pytest.skip(f"no MedMNIST data at {MEDMNIST_ROOT}; set SECURE_ONESHOT_DATA")
    return MEDMNIST_ROOT


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_medmnist_files_are_present(data_root, name: str) -> None:
    with np.load(data_root / name) as npz:
        sizes = tuple(len(npz[f"{split}_images"]) for split in ("train", "val", "test"))
        assert sizes == EXPECTED[name]
        assert npz["train_images"].shape[1:] == (28, 28) and npz["train_images"].dtype == np.uint8

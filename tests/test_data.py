"""MedMNIST loading and site partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from secure_oneshot.data import Partition, load_medmnist, load_npz, partition_indices, to_dataset
from secure_oneshot.errors import ConfigError, DataError

from .test_data_root import EXPECTED, data_root  # noqa: F401  (fixture: fails in CI if the data is missing)


@pytest.mark.parametrize("flag", ["pneumoniamnist", "breastmnist"])
def test_official_split_sizes(data_root: Path, flag: str) -> None:  # noqa: F811
    sizes = tuple(len(load_medmnist(flag, split, root=data_root)) for split in ("train", "val", "test"))
    assert sizes == EXPECTED[f"{flag}.npz"]
    split = load_medmnist(flag, "test", root=data_root)
    assert (split.n_channels, split.n_classes, split.task) == (1, 2, "binary-class")


def write_fake_medmnist(folder: Path, flag: str, n_classes: int, channels: int, n: int = 40, size: int = 28) -> Path:
    """A small MedMNIST-format file (the official key names and dtypes) with random content."""
    rng = np.random.default_rng(0)
    shape = (size, size, channels) if channels == 3 else (size, size)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, n_classes, (n, 1)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{flag}.npz"
    np.savez(path, **arrays)
    return path


def test_rgb_eight_class_file_loads_with_three_channels(tmp_path: Path) -> None:
    write_fake_medmnist(tmp_path, "bloodmnist", n_classes=8, channels=3)
    split = load_medmnist("bloodmnist", "train", root=tmp_path)
    assert (split.n_channels, split.n_classes, split.images.shape) == (3, 8, (40, 28, 28, 3))
    x, y = to_dataset(split).tensors
    assert x.shape == (40, 3, 28, 28) and x.min() >= -1 and x.max() <= 1 and y.dtype.is_floating_point is False


def test_site_own_npz(tmp_path: Path) -> None:
    path = write_fake_medmnist(tmp_path / "site", "dermamnist", n_classes=7, channels=3)
    split = load_npz(path, "dermamnist", "val")
    assert split.n_classes == 7 and len(split) == 40


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        load_medmnist("pneumoniamnist", "train", root=tmp_path, size=64)
    error = caught.value
    assert "pneumoniamnist_64.npz" in error.message and str(tmp_path) in error.message
    assert "--data-root" in error.hint and "zenodo" in error.hint and error.exit_code == 15


def test_unknown_flag(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown MedMNIST flag"):
        load_medmnist("notamnist", "train", root=tmp_path)


def test_normalisation_to_minus_one_one(data_root: Path) -> None:  # noqa: F811
    split = load_medmnist("breastmnist", "test", root=data_root)
    x, _ = to_dataset(split).tensors
    expected = split.images[0].astype(np.float32) / 255 * 2 - 1
    assert np.allclose(x[0, 0].numpy(), expected)


# --- partitions --------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), [400, 300, 200, 100])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_covers_every_sample_once_and_is_reproducible(scheme: str) -> None:
    config = Partition(n_sites=5, scheme=scheme, alpha=0.5, seed=3, min_size=20)
    parts = partition_indices(LABELS, config)
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(len(LABELS)))
    assert all(len(p) >= 20 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(LABELS, config)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(LABELS, Partition(5, scheme, 0.5, seed=4, min_size=20))))


def _skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label distribution and the global one."""
    global_dist = np.bincount(LABELS, minlength=4) / len(LABELS)
    return float(np.mean([0.5 * np.abs(np.bincount(LABELS[p], minlength=4) / len(p) - global_dist).sum() for p in parts]))


def test_dirichlet_small_alpha_is_visibly_skewed() -> None:
    iid = _skew(partition_indices(LABELS, Partition(5, "iid", seed=0)))
    skewed = _skew(partition_indices(LABELS, Partition(5, "dirichlet", alpha=0.1, seed=0, min_size=5)))
    mild = _skew(partition_indices(LABELS, Partition(5, "dirichlet", alpha=100.0, seed=0)))
    assert iid < 0.05 and mild < 0.1 and skewed > 0.3, (iid, mild, skewed)


def test_minimum_size_is_enforced_or_refused() -> None:
    with pytest.raises(ConfigError, match="cannot give"):
        partition_indices(LABELS, Partition(n_sites=20, min_size=100))
    with pytest.raises(ConfigError, match="no Dirichlet"):
        partition_indices(LABELS, Partition(n_sites=10, scheme="dirichlet", alpha=0.01, min_size=90, max_tries=5))


# --- CLI ---------------------------------------------------------------------------------------


def test_partition_cli_json(data_root: Path, capsys, tmp_path: Path) -> None:  # noqa: F811
    import json

    from secure_oneshot.cli import main

    out = tmp_path / "parts.json"
    code = main(["--json", "partition", "--data-root", str(data_root), "--flag", "breastmnist", "--sites", "3",
                 "--scheme", "dirichlet", "--alpha", "0.5", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and [s["size"] for s in summary["sites"]] == [len(s["indices"]) for s in json.loads(out.read_text())["sites"]]
    assert sum(s["size"] for s in summary["sites"]) == 546 + 78


def test_train_cli_missing_data_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from secure_oneshot.cli import main

    (tmp_path / "site.toml").write_text('[data]\nflag = "pneumoniamnist"\n')
    code = main(["train", "--config", str(tmp_path / "site.toml"), "--data-root", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 15 and "pneumoniamnist.npz not found" in err and "Traceback" not in err


def test_site_config_errors_name_file_and_line(tmp_path: Path, capsys) -> None:
    from secure_oneshot.cli import main

    (tmp_path / "site.toml").write_text('[data]\nflag = "pneumoniamnist"\n[train]\nepoch = 3\nlr = "fast"\n')
    code = main(["train", "--config", str(tmp_path / "site.toml")])
    err = capsys.readouterr().err
    assert code == 3 and "site.toml:4: train.epoch: unknown key" in err and "site.toml:5: train.lr: must be a number" in err

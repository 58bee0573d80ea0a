"""MedMNIST task types: ordinal regression (RetinaMNIST) trains and evaluates as multi-class, and says so."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from secure_oneshot.data.medmnist_data import SUPPORTED_TASKS, load_medmnist, load_npz, task_note, trained_as
from secure_oneshot.errors import DataError

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from secure_oneshot.client.train import PRESETS, DataConfig, site_data, train_classifier, training_record, write_model_dir  # noqa: E402
from secure_oneshot.models.classifier import ClassifierConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _retina_like(path: Path, n: int = 60) -> Path:
    """A RetinaMNIST-format file (5 ordinal grades, RGB 28 px) whose grade is written into the image brightness."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", n // 3), ("test", n // 3)):
        labels = rng.integers(0, 5, size=(count, 1))
        images = (labels[:, :, None, None] * 50 + rng.integers(0, 20, size=(count, 28, 28, 3))).clip(0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


def test_ordinal_regression_is_accepted_and_trained_as_multi_class() -> None:
    assert "ordinal-regression" in SUPPORTED_TASKS
    assert trained_as("ordinal-regression") == "multi-class" and trained_as("binary-class") == "binary-class"
    assert task_note("ordinal-regression") == "ordinal-regression trained as multi-class (as the MedMNIST benchmark does)"
    assert task_note("multi-class") is None


def test_retinamnist_is_no_longer_refused_for_its_task(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:   # refused only because the file is not there
        load_medmnist("retinamnist", "train", root=tmp_path)
    assert "retinamnist.npz not found" in caught.value.message


def test_multi_label_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="multi-label"):
        load_medmnist("chestmnist", "train", root=tmp_path)


def test_ordinal_site_trains_as_five_classes_and_the_record_says_so(tmp_path: Path) -> None:
    path = _retina_like(tmp_path / "retina.npz")
    split = load_npz(path, "retinamnist", "train")
    assert split.task == "ordinal-regression" and split.n_classes == 5 and split.n_channels == 3
    data_cfg = DataConfig(flag="retinamnist", file=str(path))
    data = site_data(data_cfg)
    cfg = replace(PRESETS["cpu"], epochs=1, min_steps=0, batch_size=16)
    result = train_classifier(ClassifierConfig("small-cnn", in_channels=3, num_classes=5), cfg, data)
    assert result.model(torch.zeros(2, 3, 28, 28)).shape == (2, 5)
    assert set(result.metrics["test"]) >= {"acc", "auc"}
    record = training_record(result, data_cfg, cfg)
    folder = write_model_dir(tmp_path / "model", {"classifier": {}}, record)
    data_record = json.loads((folder / "record.json").read_text())["training"]["data"]
    assert data_record["task"] == "ordinal-regression" and data_record["trained_as"] == "multi-class"
    assert data_record["note"] == "ordinal-regression trained as multi-class (as the MedMNIST benchmark does)"

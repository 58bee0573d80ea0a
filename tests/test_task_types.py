"""MedMNIST task types: ordinal regression (RetinaMNIST) trains as multi-class and says so; multi-label (ChestMNIST)
trains with BCE, is scored as medmnist scores it, and distils with per-label sigmoids, end to end."""

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


def test_every_2d_medmnist_task_type_is_supported() -> None:
    from medmnist import INFO

    assert {info["task"] for flag, info in INFO.items() if not flag.endswith("3d")} <= set(SUPPORTED_TASKS)


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


# --- multi-label ------------------------------------------------------------------------------------

LABELS = 14   # ChestMNIST's label count


def _chest_like(path: Path, n: int = 96) -> Path:
    """A ChestMNIST-format file: 14 labels, label i present when image block i is bright (a learnable rule)."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 2)):
        labels = (rng.random((count, LABELS)) < 0.4).astype(np.uint8)
        images = rng.integers(0, 40, size=(count, 28, 28)).astype(np.uint8)
        for i in range(LABELS):
            row, col = divmod(i, 4)
            images[labels[:, i] == 1, 7 * row:7 * row + 6, 7 * col:7 * col + 6] += 200
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


def test_multi_label_metrics_equal_medmnists_evaluator() -> None:
    from medmnist.evaluator import getACC, getAUC

    from secure_oneshot.metrics import classification_metrics

    rng = np.random.default_rng(3)
    labels = (rng.random((50, LABELS)) < 0.3).astype(np.int64)
    labels[0], labels[1] = 1, 0   # both values in every column
    scores = rng.random((50, LABELS)).astype(np.float32)
    ours = classification_metrics(labels, scores)
    assert ours["auc"] == pytest.approx(getAUC(labels, scores, "multi-label, binary-class"), abs=1e-12)
    assert ours["acc"] == pytest.approx(getACC(labels, scores, "multi-label, binary-class"), abs=1e-12)
    # Independent recomputation: per-label accuracy at 0.5 and per-label AUC (rank statistic), averaged.
    assert ours["acc"] == pytest.approx(((scores > 0.5) == labels).mean(axis=0).mean(), abs=1e-12)
    from sklearn.metrics import roc_auc_score
    assert ours["auc"] == pytest.approx(np.mean([roc_auc_score(labels[:, i], scores[:, i]) for i in range(LABELS)]), abs=1e-12)
    # A label column with one value has no AUC: NaN, not a crash.
    labels[:, 3] = 0
    assert np.isnan(classification_metrics(labels, scores)["auc"])


def test_multi_label_files_keep_label_vectors_and_refuse_other_values(tmp_path: Path) -> None:
    path = _chest_like(tmp_path / "chest.npz")
    split = load_npz(path, "chestmnist", "train")
    assert split.labels.shape == (96, LABELS) and split.task == "multi-label, binary-class" and split.n_classes == LABELS
    bad = dict(np.load(path))
    bad["train_labels"] = bad["train_labels"] * 2
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataError, match="0 or 1"):
        load_npz(tmp_path / "bad.npz", "chestmnist", "train")
    bad["train_labels"] = bad["train_labels"][:, :3]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataError, match=r"shape \(N, 14\)"):
        load_npz(tmp_path / "bad.npz", "chestmnist", "train")


def test_multi_label_refuses_single_label_releases(tmp_path: Path) -> None:
    from secure_oneshot.errors import ConfigError

    data = site_data(DataConfig(flag="chestmnist", file=str(_chest_like(tmp_path / "chest.npz"))))
    with pytest.raises(ConfigError, match="multi-label"):
        train_classifier(ClassifierConfig("small-cnn", 1, LABELS), replace(PRESETS["cpu"], label_counts_epsilon=1.0), data)


def test_bce_loss_honours_opacus_reduction() -> None:
    from secure_oneshot.client.multi_label import MultiLabelBCE

    loss, logits, y = MultiLabelBCE(), torch.randn(4, 3), torch.randint(0, 2, (4, 3))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    torch.testing.assert_close(loss(logits, y), expected)
    loss.reduction = "none"
    assert loss(logits, y).shape == (4,)
    torch.testing.assert_close(loss(logits, y).mean(), expected)


def test_multi_label_kd_and_teacher_pool_probabilities() -> None:
    from secure_oneshot.server.distill import per_image_kd
    from secure_oneshot.server.ensemble import Ensemble
    from secure_oneshot.server.synthesis import balanced_label_vectors

    s, t = torch.randn(5, 3), torch.randn(5, 3)
    p_t, p_s = torch.sigmoid(t / 4), torch.sigmoid(s / 4)
    by_hand = (p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()).sum(1) * 16
    torch.testing.assert_close(per_image_kd(s, t, 4.0, multi_label=True), by_hand, rtol=1e-4, atol=1e-5)
    assert per_image_kd(t, t, 4.0, multi_label=True).abs().max() < 1e-5
    sites = [torch.nn.Linear(2, 3) for _ in range(3)]
    x = torch.randn(4, 2)
    pooled = torch.stack([torch.sigmoid(m(x)) for m in sites]).mean(0)
    teacher = Ensemble(sites, multi_label=True)
    torch.testing.assert_close(torch.sigmoid(teacher(x)), pooled, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multi-label"):
        Ensemble(sites, multi_label=True, weights=torch.ones(3, 3))
    y = balanced_label_vectors(8, 5, torch.Generator().manual_seed(0))
    assert y.shape == (8, 5) and y.sum(0).tolist() == [4.0] * 5 and set(y.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(y[:, 0], y[:, 1]) or not torch.equal(y[:, 1], y[:, 2])   # not one pattern for every label


def test_multi_label_end_to_end_train_model_dir_distill_metrics(tmp_path: Path) -> None:
    from secure_oneshot.client.train import classifier_state
    from secure_oneshot.data.medmnist_data import to_dataset
    from secure_oneshot.server.execution import Execution
    from secure_oneshot.server.study import DistillJob, load_model_dirs, run_distillation

    path = _chest_like(tmp_path / "chest.npz")
    dirs = []
    for seed in range(2):
        data_cfg = DataConfig(flag="chestmnist", file=str(path))
        data = site_data(data_cfg, seed=seed)
        # 3 epochs at the full rate: the cpu preset's drops would leave one (milestones are fractions of the epochs)
        cfg = replace(PRESETS["cpu"], epochs=3, min_steps=0, batch_size=16, seed=seed, milestones=())
        result = train_classifier(ClassifierConfig("small-cnn", 1, LABELS), cfg, data)
        assert set(result.metrics["test"]) == {"acc", "auc", "balanced_acc"}
        assert result.metrics["test"]["auc"] > 0.6, result.metrics   # the rule is learnable: better than chance
        record = training_record(result, data_cfg, cfg)
        assert record["artifacts"]["classifier"]["task"] == "multi-label"
        assert record["training"]["data"]["label_counts"] == data.train.labels.sum(0).tolist()
        dirs.append(write_model_dir(tmp_path / f"site-{seed}", {"classifier": classifier_state(result.model)}, record))
    sites = load_model_dirs(dirs)
    assert all(s.multi_label for s in sites)
    test_set = to_dataset(load_npz(path, "chestmnist", "test"))
    job = DistillJob(preset="smoke", execution=Execution(device="cpu", precision="fp32", channels_last=False), epochs=1)
    run = run_distillation(sites, tmp_path / "out", job, test_set=test_set)
    assert run.synth.multi_label and run.report["task"] == "multi-label" and run.report["teacher_weighting"]["scheme"] == "equal"
    assert set(run.metrics) >= {"site-0", "site-1", "ensemble (teacher)", "fedavg (one-shot)", "global (distilled)"}
    for row in run.metrics.values():
        assert 0 <= row["acc"] <= 1 and 0 <= row["auc"] <= 1
    assert run.metrics["ensemble (teacher)"]["auc"] > 0.6
    assert (tmp_path / "out" / "global.safetensors").is_file()


def test_the_multi_label_task_is_sent_and_other_task_values_are_refused() -> None:
    from secure_oneshot.policy.metadata import review_metadata

    meta = {"architecture": "small-cnn", "in_channels": 1, "num_classes": 14, "norm": "batch", "image_size": 28}
    sent = review_metadata({"classifier": {**meta, "task": "multi-label"}}, "site-a", {"classifier"}).sent
    assert sent["artifacts"]["classifier"]["task"] == "multi-label"
    outcomes = {f.path: f.outcome for f in review_metadata({"classifier": {**meta, "task": "Jane Doe"}}, "site-a", {"classifier"}).fields}
    assert outcomes["artifacts.classifier.task"] != "send"

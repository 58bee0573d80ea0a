"""The ``paper`` preset against the method's published recipe (its public code, read setting by setting).

The published loops count epochs from 1 and call ``adjust_learning_rate(epoch)`` at the start of each:
``lr`` while ``epoch < 50``, ``lr * 0.1`` while ``epoch < 75``, else ``lr * 0.01``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_oneshot.client.train import PRESETS as TRAIN_PRESETS
from secure_oneshot.client.train import TrainConfig, _scheduler, train_classifier, training_record
from secure_oneshot.data.medmnist_data import MedMNISTSplit, SiteData
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.distill import DistillConfig, learning_rate
from secure_oneshot.server.study import PRESETS, DistillJob, SiteModel


def published_rate(epoch_from_1: int, lr_init: float = 1e-3) -> float:
    """The published ``adjust_learning_rate`` (lr_step1 = 50, lr_step2 = 75), written out."""
    if epoch_from_1 < 50:
        return lr_init
    if epoch_from_1 < 75:
        return lr_init * 0.1
    return lr_init * 0.1 * 0.1


PUBLISHED = [published_rate(e) for e in range(1, 101)]
# The same schedule spelled out: 49 epochs at 1e-3, 25 at 1e-4, 26 at 1e-5.
assert PUBLISHED == [1e-3] * 49 + [1e-3 * 0.1] * 25 + [1e-3 * 0.1 * 0.1] * 26


def _table(ours: list[float]) -> str:
    return "\n".join(f"epoch {e + 1:3d}: ours {o:.0e}  published {p:.0e}{'  <-- differs' if not np.isclose(o, p) else ''}"
                     for e, (o, p) in enumerate(zip(ours, PUBLISHED)))


def test_student_rate_per_epoch_is_the_published_schedule() -> None:
    cfg = DistillConfig()   # the paper preset's distillation: no overrides
    assert PRESETS["paper"][1] == {}
    ours = [learning_rate(cfg, e) for e in range(cfg.epochs)]
    assert cfg.epochs == 100 and np.allclose(ours, PUBLISHED, rtol=1e-12, atol=0), _table(ours)


def test_site_rate_per_epoch_is_the_published_schedule() -> None:
    cfg = TRAIN_PRESETS["fedisca"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = _scheduler(optimizer, cfg)
    ours = []
    for _ in range(cfg.epochs):   # the training loop: one epoch at the current rate, then step
        ours.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert cfg.epochs == 100 and np.allclose(ours, PUBLISHED, rtol=1e-12, atol=0), _table(ours)


# --- the site's checkpoint choice -----------------------------------------------------------------


def _split(images: np.ndarray, labels: np.ndarray, split: str) -> MedMNISTSplit:
    return MedMNISTSplit("synthetic", split, images, labels.astype(np.int64), 2, 1, "binary-class")


def _early_peak_site() -> SiteData:
    """Training teaches "bright = class 1"; the validation slice says the opposite, so the more the model learns
    the worse it validates: validation accuracy peaks early and the last epoch is the worst."""
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 2
    images = (rng.integers(0, 60, (64, 28, 28)) + 40 * labels[:, None, None]).astype(np.uint8)
    val_labels = np.arange(32) % 2
    val_images = (rng.integers(0, 60, (32, 28, 28)) + 40 * (1 - val_labels)[:, None, None]).astype(np.uint8)
    return SiteData(_split(images, labels, "train"), _split(val_images, val_labels, "val"), _split(images[:16], labels[:16], "test"))


TINY = TrainConfig(epochs=5, lr=0.005, batch_size=16, milestones=(), seed=3)   # no milestones: k epochs of it = its first k


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_best_val_hands_over_the_best_epochs_weights() -> None:
    site, model_cfg = _early_peak_site(), ClassifierConfig("small-cnn")
    best = train_classifier(model_cfg, replace(TINY, checkpoint="best-val"), site)
    val_acc = [row["val_acc"] for row in best.history]
    epoch = 1 + int(np.argmax(val_acc))   # ties: the earliest, as the published strict "<"
    assert epoch < TINY.epochs and val_acc[-1] < max(val_acc), val_acc   # the data does what it is built for
    assert best.checkpoint is not None and best.checkpoint["choice"] == "best-val" and best.checkpoint["epoch"] == epoch, best.checkpoint
    assert best.checkpoint["val_acc"] == pytest.approx(max(val_acc))
    assert best.metrics["val"]["acc"] == pytest.approx(max(val_acc))   # the handed-over model validates as the best epoch did

    # Training is deterministic: the first `epoch` epochs of the same run give that epoch's weights exactly.
    until_best = train_classifier(model_cfg, replace(TINY, epochs=epoch, checkpoint="last"), site)
    last = train_classifier(model_cfg, replace(TINY, checkpoint="last"), site)
    handed, expected, final = _weights(best.model), _weights(until_best.model), _weights(last.model)
    assert all(torch.equal(handed[k], expected[k]) for k in expected)
    assert any(not torch.equal(handed[k], final[k]) for k in final if final[k].is_floating_point())
    assert last.checkpoint == {"choice": "last", "epoch": TINY.epochs, "val_acc": pytest.approx(val_acc[-1], abs=1e-6),
                               "selected_on": "nothing (last epoch)"}


def test_training_record_names_the_choice_and_epoch(tmp_path: Path) -> None:
    from secure_oneshot.client.train import DataConfig

    result = train_classifier(ClassifierConfig("small-cnn"), replace(TINY, epochs=3, checkpoint="best-val"), _early_peak_site())
    record = training_record(result, DataConfig(), result.config)
    assert record["training"]["checkpoint"]["choice"] == "best-val"
    assert record["training"]["checkpoint"]["epoch"] == result.checkpoint["epoch"]
    assert record["training"]["config"]["checkpoint"] == "best-val"


def test_fedisca_preset_hands_over_the_best_validation_epoch() -> None:
    assert TRAIN_PRESETS["fedisca"].checkpoint == "best-val"
    assert TRAIN_PRESETS["cpu"].checkpoint == "last" and TRAIN_PRESETS["dp"].checkpoint == "last"


def test_best_val_under_dp_is_refused_before_training() -> None:
    cfg = replace(TINY, checkpoint="best-val", dp_epsilon=8.0)
    with pytest.raises(ConfigError, match="private records") as raised:
        train_classifier(ClassifierConfig("small-cnn"), cfg, _early_peak_site())
    assert raised.value.exit_code == 3 and "last" in (raised.value.hint or "")


def test_unknown_checkpoint_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="checkpoint choice 'best'"):
        train_classifier(ClassifierConfig("small-cnn"), replace(TINY, checkpoint="best"), _early_peak_site())


# --- 224 px: the published large-image settings, ImageNet weights from a local file ---------------------------


def _site(architecture: str = "resnet18", channels: int = 3) -> SiteModel:
    cfg = ClassifierConfig(architecture, channels, 2)
    return SiteModel("site-a", build_classifier(cfg).eval(), cfg)


@pytest.fixture()
def imagenet_file(tmp_path: Path) -> Path:
    """A stand-in for torchvision's resnet18 ImageNet state dict (same names and shapes, 1000-class head)."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    state = build_classifier(ClassifierConfig("resnet18", 3, 1000)).state_dict()
    path = tmp_path / "resnet18-imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_paper_at_28_px_is_the_published_28_px_setting() -> None:
    synth, dcfg = DistillJob(preset="paper").configs([_site("resnet18-cifar", 1)])
    assert (synth.batch_size, synth.steps, synth.jitter, synth.snapshot_every) == (256, 500, 2, 1)
    assert (synth.lr, synth.bn_weight, synth.tv_weight) == (0.05, 10.0, 2.5e-5)
    assert (dcfg.epochs, dcfg.lr, dcfg.momentum, dcfg.weight_decay, dcfg.milestones, dcfg.temperature) == \
        (100, 1e-3, 0.9, 5e-4, (0.5, 0.75), 20.0)


def test_paper_at_224_px_follows_the_published_224_px_settings(imagenet_file: Path) -> None:
    job = DistillJob(preset="paper", image_size=224, imagenet_weights=str(imagenet_file))
    synth, dcfg = job.configs([_site()])
    assert (synth.batch_size, synth.steps, synth.jitter, synth.snapshot_every, synth.image_size) == (50, 1000, 30, 1, 224)
    assert dcfg == DistillConfig()
    # the reduced presets keep their own settings at 224 px
    gpu, _ = DistillJob(preset="gpu", image_size=224).configs([_site()])
    assert (gpu.batch_size, gpu.steps, gpu.jitter) == (256, 200, 2)


def test_paper_at_224_px_without_imagenet_weights_is_refused_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="ImageNet") as raised:
        DistillJob(preset="paper", image_size=224)
    assert raised.value.exit_code == 3 and "--imagenet-weights" in raised.value.hint
    assert "\n" not in str(raised.value)


def test_imagenet_weights_load_all_but_the_head(imagenet_file: Path) -> None:
    from safetensors.torch import load_file

    from secure_oneshot.models.imagenet_init import initial_classifier

    source = load_file(str(imagenet_file))
    rgb = initial_classifier(ClassifierConfig("resnet18", 3, 2), str(imagenet_file)).state_dict()
    assert all(torch.equal(rgb[k], source[k]) for k in source if not k.startswith("fc."))
    assert rgb["fc.weight"].shape == (2, 512)
    grey = initial_classifier(ClassifierConfig("resnet18", 1, 2), str(imagenet_file)).state_dict()
    torch.testing.assert_close(grey["conv1.weight"], source["conv1.weight"].sum(dim=1, keepdim=True))


def test_imagenet_weights_must_be_a_local_safetensors_file(tmp_path: Path, imagenet_file: Path) -> None:
    from secure_oneshot.models.imagenet_init import initial_classifier

    with pytest.raises(ConfigError, match="not found") as missing:
        initial_classifier(ClassifierConfig("resnet18", 3, 2), str(tmp_path / "absent.safetensors"))
    assert "cannot be downloaded" in missing.value.hint
    pickled = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, pickled)   # a .pth is a pickle: never loaded
    with pytest.raises(ConfigError, match="not a safetensors file"):
        initial_classifier(ClassifierConfig("resnet18", 3, 2), str(pickled))
    with pytest.raises(ConfigError, match="no ImageNet initialisation"):
        initial_classifier(ClassifierConfig("small-cnn", 3, 2), str(imagenet_file))


def test_site_training_can_start_from_imagenet_weights(imagenet_file: Path) -> None:
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 255, (8, 32, 32, 3)).astype(np.uint8), np.arange(8) % 2
    split = MedMNISTSplit("synthetic", "train", images, labels.astype(np.int64), 2, 3, "binary-class")
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.0, momentum=0.0, weight_decay=0.0, imagenet_weights=str(imagenet_file))
    result = train_classifier(ClassifierConfig("resnet18", 3, 2), cfg, SiteData(split, split))
    from safetensors.torch import load_file

    loaded = load_file(str(imagenet_file))
    trained = result.model.state_dict()
    assert torch.equal(trained["conv1.weight"], loaded["conv1.weight"])   # lr 0: the ImageNet weights themselves


@pytest.mark.parametrize("command", ["distill", "demo", "experiment"])
def test_help_says_gpu_is_reduced_and_not_the_published_method(command: str) -> None:
    text = subprocess.run([sys.executable, "-m", "secure_oneshot", command, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"}, check=True).stdout
    assert "reduced preset" in text.lower() and "not the published method" in text, text


def test_cpu_and_dp_site_presets_keep_the_drops_they_were_measured_with() -> None:
    """The dp preset's accuracy floor (test_train) was measured with drops from 0-based epochs 8 and 11 of 15."""
    for name in ("cpu", "dp"):
        cfg = TRAIN_PRESETS[name]
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, rates = _scheduler(optimizer, cfg), []
        for _ in range(cfg.epochs):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert np.allclose(rates, [1.0] * 8 + [0.1] * 3 + [0.01] * 4), (name, rates)


def test_the_server_cpu_preset_keeps_the_drops_its_studies_were_measured_with() -> None:
    from secure_oneshot.server.distill import DistillConfig, learning_rate
    from secure_oneshot.server.study import PRESETS

    options = PRESETS["cpu"][1]
    six = DistillConfig(**{**options, "epochs": 6})
    assert [round(learning_rate(six, e) / six.lr, 4) for e in range(6)] == [1, 1, 1, 0.1, 0.01, 0.01]
    sixteen = DistillConfig(**options)
    assert [round(learning_rate(sixteen, e) / sixteen.lr, 4) for e in range(16)] == [1] * 9 + [0.1] * 3 + [0.01] * 4

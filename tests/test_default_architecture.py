"""A site config that names no architecture trains the one for its image size; one that names it keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secure_oneshot.cli import main
from secure_oneshot.client.site_config import site_config_from_text
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.specs import CLASSIFIER_ARCHITECTURES, config_default_architecture


def test_the_default_per_size():
    assert [config_default_architecture(s) for s in (28, 64, 128, 224)] == ["small-cnn", "resnet18-cifar", "resnet18", "resnet18"]
    assert all(config_default_architecture(s) in CLASSIFIER_ARCHITECTURES for s in (28, 64, 128, 224))
    with pytest.raises(ValueError):
        config_default_architecture(0)


def _folder(root: Path, size: int = 40) -> Path:
    rng = np.random.default_rng(1)
    for name in ("normal", "pneumonia"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(("size", "expected"), [(28, "small-cnn"), (64, "resnet18-cifar"), (128, "resnet18"), (224, "resnet18")])
def test_a_medmnist_config_without_architecture_gets_the_size_default(size, expected):
    assert site_config_from_text(f"[data]\nsize = {size}\n").model.architecture == expected


def test_an_own_images_config_at_224_px_gets_the_imagenet_stem(tmp_path):
    text = f'[data]\nsource = "folder"\nroot = "{tmp_path}"\nclasses = ["normal", "pneumonia"]\nsize = 224\n'
    assert site_config_from_text(text).model.architecture == "resnet18"
    assert site_config_from_text(text.replace("size = 224\n", "")).model.architecture == "small-cnn"   # 28 px, as before


@pytest.mark.parametrize("size", [28, 224])
def test_a_named_architecture_is_kept_at_every_size(size):
    cfg = site_config_from_text(f'[data]\nsize = {size}\n[model]\narchitecture = "vgg11-bn"\n')
    assert cfg.model.architecture == "vgg11-bn"


def test_an_unknown_architecture_is_still_refused():
    with pytest.raises(ConfigError, match="model.architecture"):
        site_config_from_text('[data]\nsize = 224\n[model]\narchitecture = "resnet1800"\n')


def test_train_at_128_px_records_the_default_architecture(tmp_path, capsys):
    images = _folder(tmp_path / "images")
    config = tmp_path / "site.toml"
    config.write_text(f'[data]\nsource = "folder"\nroot = "{images}"\nclasses = ["normal", "pneumonia"]\nsize = 128\n'
                      f'[train]\nepochs = 1\nbatch_size = 8\n[output]\ndir = "{tmp_path / "model"}"\n')
    assert main(["train", "--config", str(config), "--threads", "1", "--json"]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "model" / "record.json").read_text())
    assert record["artifacts"]["classifier"]["architecture"] == "resnet18"
    assert record["training"]["data"]["size"] == 128

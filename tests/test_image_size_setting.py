"""The MedMNIST+ image size of demo and experiment: ``demo --size`` and ``[study] size``.

* a study at 64 px reads ``<flag>_64.npz`` (MedMNIST's naming), trains ResNet-18-family sites by default and
  distils a 64 px global model, end to end (small generated files in MedMNIST's layout);
* a missing 64 px file is refused with a DataError (exit 15) naming the expected file, before anything is written;
* 28 px stays the default, with its architecture; a size that is not a MedMNIST+ size is a ConfigError.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import secure_oneshot.server.study as server_study
from secure_oneshot.cli import main
from secure_oneshot.demo import DemoConfig, server_command
from secure_oneshot.errors import ConfigError
from secure_oneshot.research.experiment import study_from_text

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]

FLAG = "pneumoniamnist"


def medmnist_npz(folder: Path, size: int, counts: tuple[int, int, int] = (24, 8, 8), seed: int = 0) -> Path:
    """A MedMNIST-layout file (``<split>_images`` uint8 (N, size, size), ``<split>_labels`` (N, 1)) with both classes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        labels = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
        images = rng.integers(0, 120, (n, size, size), dtype=np.uint8)
        images[labels[:, 0] == 1, :, size // 2:] += 100   # class 1 is brighter on the right
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{FLAG}.npz" if size == 28 else f"{FLAG}_{size}.npz")
    np.savez(path, **arrays)
    return path


STUDY = """
[study]
name = "size64"
flags = ["pneumoniamnist"]
sites = 2
alphas = ["iid"]
seeds = [0]
size = 64

[site]
preset = "cpu"
epochs = 1

[server]
preset = "smoke"
methods = ["inversion"]
epochs = 1
"""


@pytest.mark.slow   # a whole study (2 ResNet-18 sites at 64 px, export, ingest, distil): about a CPU-minute
def test_a_64_px_study_runs_end_to_end_with_resnet18_sites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # A smaller smoke synthesis, and the ImageNet-stem ResNet-18 (its 64 px default, resnet18-cifar, keeps 64 x 64
    # feature maps through its first stage: many times the CPU time): what is checked here (files, architectures,
    # image size) does not depend on either.
    monkeypatch.setitem(server_study.PRESETS, "smoke", ({"batch_size": 4, "steps": 2, "bn_weight": 0.1}, {"epochs": 1}))
    root = tmp_path / "data"
    medmnist_npz(root, 64)
    assert study_from_text(STUDY).architecture == "resnet18-cifar"     # the default at 64 px
    text = STUDY.replace('preset = "cpu"', 'preset = "cpu"\narchitecture = "resnet18"')
    config = tmp_path / "study.toml"
    config.write_text(text)
    study = study_from_text(text)
    assert study.size == 64 and study.architecture == "resnet18"
    out = tmp_path / "out"
    assert main(["experiment", str(config), "--out", str(out), "--data-root", str(root)]) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 1 and 0.0 <= rows[0]["global_auc"] <= 1.0
    [report_file] = (out / "cells").glob("*/server/global/report.json")
    report = json.loads(report_file.read_text())
    assert {s["architecture"] for s in report["sites"]} == {"resnet18"}
    assert report["student"]["architecture"] == "resnet18"
    assert '"image_size": 64' in report_file.read_text()
    records = list((out / "cache").glob("*/sites/*/model/*.json"))
    assert records and any('"size": 64' in r.read_text() for r in records)   # the sites trained on the 64 px file


def test_a_missing_64_px_file_is_refused_before_anything_is_written(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    medmnist_npz(root, 28)                          # the shared data only has 28 px files
    config = tmp_path / "study.toml"
    config.write_text(STUDY)
    out = tmp_path / "out"
    assert main(["experiment", str(config), "--out", str(out), "--data-root", str(root)]) == 15
    err = capsys.readouterr().err
    assert "pneumoniamnist_64.npz not found" in err and "hint:" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("secure-oneshot: error")]) == 1
    assert not out.exists()
    demo_out = tmp_path / "demo"
    assert main(["demo", "--size", "64", "--preset", "smoke", "--data-root", str(root), "--out", str(demo_out)]) == 15
    assert "pneumoniamnist_64.npz not found" in capsys.readouterr().err
    assert not demo_out.exists()


def test_28_px_stays_the_default_and_bad_sizes_are_refused(tmp_path: Path) -> None:
    default = study_from_text(STUDY.replace("size = 64\n", ""))
    assert default.size == 28 and default.architecture == "small-cnn"
    assert study_from_text(STUDY.replace("size = 64", "size = 224")).architecture == "resnet18"
    assert study_from_text(STUDY.replace('preset = "cpu"', 'preset = "cpu"\narchitecture = "small-cnn"')).architecture == "small-cnn"
    for bad in ("100", "\"64\"", "true"):
        with pytest.raises(ConfigError, match="study.size: .* is not a MedMNIST\\+ size"):
            study_from_text(STUDY.replace("size = 64", f"size = {bad}"))
    with pytest.raises(ConfigError, match="paper at 224 px"):
        study_from_text(STUDY.replace("size = 64", "size = 224").replace('preset = "smoke"', 'preset = "paper"'))
    assert DemoConfig(out=tmp_path, preset="cpu").resolved_preset().architecture == "small-cnn"
    assert DemoConfig(out=tmp_path, preset="cpu", size=64).resolved_preset().architecture == "resnet18-cifar"
    assert DemoConfig(out=tmp_path, preset="gpu", size=224).resolved_preset().architecture == "resnet18"
    command = server_command(DemoConfig(out=tmp_path, preset="cpu", size=64))
    assert command[command.index("--image-size") + 1] == "64"
    assert "--image-size" not in server_command(DemoConfig(out=tmp_path, preset="cpu"))
    with pytest.raises(ConfigError, match="not a MedMNIST\\+ size"):
        DemoConfig(out=tmp_path, size=32)
    with pytest.raises(ConfigError, match="paper preset at 224 px"):
        DemoConfig(out=tmp_path, preset="paper", size=224)

"""``secure-oneshot data check``: every problem kind is reported (text and --json), exit 0 clean / 15 otherwise, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from secure_oneshot.cli import main

CLASSES = '["normal", "pneumonia", "covid"]'


def clean_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, shapes in (("normal", [(28, 28), (28, 28)]), ("pneumonia", [(40, 30)])):
        (root / name).mkdir(parents=True)
        for i, shape in enumerate(shapes):
            Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(root / name / f"{i}.png")
    return root


def check(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_clean_folder_exits_0_with_counts_and_sizes(tmp_path, capsys):
    root = clean_folder(tmp_path / "images")
    code, out, _ = check(capsys, "--source", "folder", "--root", root, "--classes", "normal,pneumonia")
    assert code == 0
    assert "class normal                     2" in out and "class pneumonia                  1" in out
    assert "28 x 28               2" in out and "30 x 40               1" in out and "clean: no problems found" in out


def test_a_messy_folder_reports_every_problem_kind(tmp_path, capsys):
    root = clean_folder(tmp_path / "images")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "pneumonia" / "copy.png").write_bytes((root / "normal" / "0.png").read_bytes())
    (root / "unlisted").mkdir()
    os.symlink("/etc/hostname", root / "normal" / "link.png")
    config = tmp_path / "site.toml"
    config.write_text(f'[data]\nsource = "folder"\nroot = "{root}"\nclasses = {CLASSES}\n[train]\nepochs = 1\n')
    code, out, _ = check(capsys, "--config", config)
    assert code == 15
    assert "normal/broken.png: corrupt image (OSError)" in out
    assert "normal/link.png: is a symbolic link" in out
    assert "unlisted: folder is not a class in the label map" in out
    assert "covid: class in the label map has no folder" in out
    assert "normal/0.png = pneumonia/copy.png  (labels differ: normal, pneumonia)" in out
    assert "5 problem(s) found" in out
    code, out, _ = check(capsys, "--config", config, "--json")
    report = json.loads(out)
    assert code == 15 and report["problems"] == 5 and report["records"] == 4
    assert report["counts"] == {"normal": 2, "pneumonia": 2, "covid": 0}
    assert report["sizes"] == {"28 x 28": 3, "30 x 40": 1}
    assert [u["file"] for u in report["unreadable"]] == ["normal/link.png", "normal/broken.png"]
    assert report["labels_outside_map"][0]["file"] == "unlisted"
    assert report["duplicates"] == [{"files": ["normal/0.png", "pneumonia/copy.png"], "labels": ["normal", "pneumonia"]}]


def test_a_manifest_with_labels_outside_the_map_and_missing_files(tmp_path, capsys):
    root = clean_folder(tmp_path / "images")
    (root / "m.csv").write_text("path,label\nnormal/0.png,normal\nnormal/1.png,tumour\nnormal/9.png,normal\n../x.png,normal\n")
    code, out, _ = check(capsys, "--source", "manifest", "--manifest", root / "m.csv", "--classes", "normal,pneumonia", "--json")
    report = json.loads(out)
    assert code == 15 and report["records"] == 1
    assert "label 'tumour' is not in the label map" in report["labels_outside_map"][0]["problem"]
    problems = sorted(u["problem"] for u in report["unreadable"])
    assert problems[0].startswith("cannot open") and "leaves the manifest's folder" in problems[1]


def test_wrong_usage_is_a_config_error(tmp_path, capsys):
    code, _, err = check(capsys, "--source", "folder", "--root", tmp_path)
    assert code == 3 and "label map" in err
    code, _, err = check(capsys, "--source", "folder", "--root", tmp_path / "nowhere", "--classes", "a,b")
    assert code == 15 and "not found" in err and "Traceback" not in err
    config = tmp_path / "site.toml"
    config.write_text("[data]\nflag = \"pneumoniamnist\"\n")
    code, _, err = check(capsys, "--config", config)
    assert code == 3 and "own images" in err


def test_data_check_imports_no_ml_library(tmp_path):
    root = clean_folder(tmp_path / "images")
    probe = ("import sys, json; from secure_oneshot.cli import main; code = main(sys.argv[1:]); "
             "print(json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'torchvision', 'medmnist', 'opacus', 'sklearn') "
             "if m in sys.modules)}))")
    done = subprocess.run([sys.executable, "-c", probe, "data", "check", "--source", "folder", "--root", str(root),
                           "--classes", "normal,pneumonia", "--json"], capture_output=True, text=True, timeout=120)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last == {"code": 0, "heavy": []}, done.stderr

"""Multi-label CSV manifests (one 0/1 column per label): config, loading, ``data check`` counts, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secure_oneshot.cli import main
from secure_oneshot.client.site_config import site_config_from_text
from secure_oneshot.data.image_files import SourceConfig
from secure_oneshot.data.medmnist_data import MULTI_LABEL
from secure_oneshot.data.sources import load_source, source_record, source_site_data
from secure_oneshot.errors import ConfigError, DataError

LABELS = ("effusion", "nodule", "mass")
# path, effusion, nodule, mass
ROWS = [("img/0.png", 1, 0, 0), ("img/1.png", 0, 1, 1), ("img/2.png", 1, 1, 0), ("img/3.png", 0, 0, 0),
        ("img/4.png", 1, 0, 1), ("img/5.png", 0, 1, 0), ("img/6.png", 1, 1, 1), ("img/7.png", 0, 0, 1)]


def write_manifest(root: Path, rows=ROWS, header=("path", *LABELS)) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    for row in rows:
        Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(root / row[0])
    text = ",".join(header) + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows)
    (root / "manifest.csv").write_text(text)
    return root / "manifest.csv"


def config_text(manifest: Path, extra: str = "") -> str:
    return f'[data]\nsource = "manifest"\nmanifest = "{manifest}"\nlabel_columns = {json.dumps(list(LABELS))}\n{extra}'


def test_label_columns_make_a_multi_label_source(tmp_path):
    cfg = site_config_from_text(config_text(write_manifest(tmp_path)))
    assert cfg.source.multi_label and cfg.source.classes == LABELS and cfg.source.label_columns == LABELS
    loaded = load_source(cfg.source)
    assert loaded.task == MULTI_LABEL
    assert loaded.labels.dtype == np.int64 and loaded.labels.tolist() == [list(r[1:]) for r in ROWS]
    data = source_site_data(cfg.source, 0.25, seed=0)
    assert (data.train.task, data.train.n_classes) == (MULTI_LABEL, 3)
    assert data.train.labels.shape == (6, 3) and data.val.labels.shape == (2, 3)
    assert source_record(cfg.source)["classes"] == list(LABELS)


def test_data_check_reports_positives_per_label(tmp_path, capsys):
    manifest = write_manifest(tmp_path)
    config = tmp_path / "site.toml"
    config.write_text(config_text(manifest))
    assert main(["data", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "8 readable records, 3 labels (multi-label" in out
    assert "label effusion                   4" in out and "label nodule                     4" in out and "label mass                       4" in out
    assert main(["data", "check", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"effusion": 4, "nodule": 4, "mass": 4} and report["task"] == "multi-label"
    # the same through flags only
    assert main(["data", "check", "--source", "manifest", "--manifest", str(manifest), "--label-columns", ",".join(LABELS), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"effusion": 4, "nodule": 4, "mass": 4}


@pytest.mark.parametrize("value", ["2", "yes", "-1", "0.5", ""])
def test_a_value_other_than_0_or_1_is_one_line_naming_file_row_and_column(tmp_path, capsys, value):
    rows = list(ROWS)
    rows[2] = ("img/2.png", 1, value, 0)
    manifest = write_manifest(tmp_path, rows)
    source = site_config_from_text(config_text(manifest)).source
    with pytest.raises(DataError) as info:
        load_source(source)
    message = info.value.message
    assert "\n" not in message
    assert "manifest.csv line 4" in message and "img/2.png" in message and "column 'nodule'" in message and "not 0 or 1" in message
    config = tmp_path / "site.toml"
    config.write_text(config_text(manifest))
    assert main(["data", "check", "--config", str(config)]) == DataError.exit_code == 15
    out = capsys.readouterr().out
    assert "labels outside the label map: 1" in out and "column 'nodule'" in out


def test_a_missing_label_column_is_named(tmp_path):
    manifest = write_manifest(tmp_path, [r[:3] for r in ROWS], header=("path", "effusion", "nodule"))
    with pytest.raises(DataError, match="no column 'mass'"):
        load_source(SourceConfig("manifest", LABELS, manifest=str(manifest), label_columns=LABELS))


@pytest.mark.parametrize(("extra", "problem"), [
    ('classes = ["a", "b"]\n', "data.classes"),
    ('label_column = "label"\n', "data.label_column"),
])
def test_label_columns_do_not_go_with_a_single_label_map(tmp_path, extra, problem):
    with pytest.raises(ConfigError, match=problem):
        site_config_from_text(config_text(write_manifest(tmp_path), extra))


def test_label_columns_are_refused_for_folders_and_medmnist(tmp_path):
    with pytest.raises(ConfigError, match="data.label_columns"):
        site_config_from_text(f'[data]\nsource = "folder"\nroot = "{tmp_path}"\nlabel_columns = ["a", "b"]\n')
    with pytest.raises(ConfigError, match="data.label_columns"):
        site_config_from_text('[data]\nlabel_columns = ["a", "b"]\n')
    with pytest.raises(ConfigError, match="at least two label columns"):
        site_config_from_text(f'[data]\nsource = "manifest"\nmanifest = "{tmp_path}/m.csv"\nlabel_columns = ["a"]\n')


def test_flags_refuse_label_columns_with_classes(tmp_path, capsys):
    manifest = write_manifest(tmp_path)
    code = main(["data", "check", "--source", "manifest", "--manifest", str(manifest), "--label-columns", "a,b", "--classes", "a,b"])
    assert code == ConfigError.exit_code
    assert "--label-columns" in capsys.readouterr().err

"""Multi-label sites through sealed bundles: train (CSV manifest, one 0/1 column per label) -> export (signed policy,
real keys) -> ingest -> distill, all through the CLI; the multi-label flag travels in the signed manifest."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError, PolicyViolationError

pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LABELS = ("effusion", "nodule", "mass")


def multi_label_manifest(root: Path, seed: int, n: int = 32) -> Path:
    """PNGs and a manifest: label i present when image block i is bright (a learnable rule)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines = ["path," + ",".join(LABELS)]
    for i in range(n):
        labels = (rng.random(len(LABELS)) < 0.5).astype(int)
        image = rng.integers(0, 40, (28, 28)).astype(np.uint8)
        for j, on in enumerate(labels):
            if on:
                image[2:12, 9 * j:9 * j + 8] += 200
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png," + ",".join(map(str, labels)))
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def train_site(root: Path, seed: int, capsys, labels: str | None = None) -> Path:
    manifest = multi_label_manifest(root / "data", seed)
    if labels is None:
        data = f'label_columns = {json.dumps(list(LABELS))}'
    else:   # one class per record: the first label column, as a binary task
        data = f'label_column = "{labels}"\nclasses = ["0", "1"]'
    config = root / "site.toml"
    config.write_text(f'[data]\nsource = "manifest"\nmanifest = "{manifest}"\n{data}\n'
                      f'[train]\nepochs = 1\nbatch_size = 16\nseed = {seed}\n[output]\ndir = "{root / "model"}"\n')
    assert main(["train", "--config", str(config), "--threads", "1", "--json"]) == 0
    capsys.readouterr()
    return root / "model"


@pytest.fixture
def study(tmp_path):
    """Identities, a trust store and signed policies as the demo writes them (real keys, real policy)."""
    from secure_oneshot.demo import create_identities, write_policies

    names = ["hospital-1", "hospital-2"]
    ids, trust = create_identities(tmp_path / "run", names)
    export_policy, ingest_policy = write_policies(tmp_path / "run", ids, names)
    return tmp_path / "run", trust, export_policy, ingest_policy


def export(run: Path, trust: Path, policy: Path, site: str, model: Path, server: Path, capsys) -> int:
    keys = run / "keys"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the demo keys are unprotected on purpose
        code = main(["export", "--model", str(model), "--policy", str(policy), "--key", str(keys / f"{site}.key"),
                     "--to", str(keys / "server.pub"), "--trust", str(trust), "--out", str(server / "inbox" / f"{site}.sob"),
                     "--audit", str(run / f"{site}-audit.jsonl")])
    capsys.readouterr()
    return code


def server_args(run: Path, trust: Path) -> list[str]:
    return ["--key", str(run / "keys" / "server.key"), "--trust", str(trust)]


def test_multi_label_sites_train_export_ingest_distill(study, tmp_path, capsys):
    run, trust, export_policy, ingest_policy = study
    server = tmp_path / "server"
    (server / "inbox").mkdir(parents=True)
    for i, site in enumerate(["hospital-1", "hospital-2"]):
        model = train_site(tmp_path / site, seed=i, capsys=capsys)
        record = json.loads((model / "record.json").read_text())
        assert record["artifacts"]["classifier"]["task"] == "multi-label"
        assert record["artifacts"]["classifier"]["num_classes"] == len(LABELS)
        assert record["training"]["data"]["task"] == "multi-label, binary-class" and record["training"]["data"]["classes"] == list(LABELS)
        assert export(run, trust, export_policy, site, model, server, capsys) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--json", "ingest", "--server-dir", str(server), "--policy", str(ingest_policy), *server_args(run, trust)]) == 0
        ingested = json.loads(capsys.readouterr().out)
        # the signed manifest carries the flag: each accepted site is read back as a multi-label model
        from secure_oneshot.keys import load_identity, load_trust_store
        from secure_oneshot.server.study import load_accepted
        sites = load_accepted(server / "accepted", load_identity(run / "keys" / "server.key", None), load_trust_store(trust))
        assert len(sites) == 2 and all(s.multi_label and s.config.num_classes == len(LABELS) for s in sites)
        code = main(["--json", "distill", "--server-dir", str(server), *server_args(run, trust), "--policy", str(ingest_policy),
                     "--preset", "smoke", "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "global")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert len(list((server / "accepted").glob("*.sob"))) == 2, ingested
    report = json.loads((tmp_path / "global" / "report.json").read_text())
    assert report["task"] == "multi-label"
    assert report["student"]["num_classes"] == len(LABELS)
    assert (tmp_path / "global" / "global.safetensors").is_file()


def test_a_multi_label_and_a_single_label_site_are_not_distilled_together(study, tmp_path, capsys):
    run, trust, export_policy, ingest_policy = study
    server = tmp_path / "server"
    (server / "inbox").mkdir(parents=True)
    multi = train_site(tmp_path / "hospital-1", seed=0, capsys=capsys)
    single = train_site(tmp_path / "hospital-2", seed=1, capsys=capsys, labels="effusion")
    assert "task" not in json.loads((single / "record.json").read_text())["artifacts"]["classifier"]
    assert export(run, trust, export_policy, "hospital-1", multi, server, capsys) == 0
    assert export(run, trust, export_policy, "hospital-2", single, server, capsys) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["ingest", "--server-dir", str(server), "--policy", str(ingest_policy), *server_args(run, trust)]) == 0
        code = main(["distill", "--server-dir", str(server), *server_args(run, trust), "--policy", str(ingest_policy),
                     "--preset", "smoke", "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "multi-label" in err and "Traceback" not in err
    assert not (server / "global" / "global.safetensors").exists()


def test_a_record_naming_another_task_does_not_leave(study, tmp_path, capsys):
    run, trust, export_policy, _ = study
    model = train_site(tmp_path / "hospital-1", seed=0, capsys=capsys)
    record = json.loads((model / "record.json").read_text())
    record["artifacts"]["classifier"]["task"] = "multi-label; Doe^Jane"   # a value the allow-list does not know
    (model / "record.json").write_text(json.dumps(record))
    server = tmp_path / "server"
    (server / "inbox").mkdir(parents=True)
    assert export(run, trust, export_policy, "hospital-1", model, server, capsys) in (ConfigError.exit_code, PolicyViolationError.exit_code)
    assert not list((server / "inbox").iterdir())

"""The main job: `secure-oneshot demo` end to end from the CLI (smoke preset, real PneumoniaMNIST), and
`secure-oneshot distill` from an ingest server folder and from model directories.

The smoke preset trains 3 hospitals for 2 epochs and distils for 2 short epochs, here on every 4th record of
PneumoniaMNIST.  It checks plumbing and protocol, not utility (the utility numbers are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from secure_oneshot import audit
from secure_oneshot.cli import main
from secure_oneshot.keys import load_public

from .data_helpers import thinned_root
from .test_data import write_fake_medmnist
from .test_data_root import data_root  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SITES = ["hospital-1", "hospital-2", "hospital-3"]


@pytest.fixture(scope="module")
def demo_run(data_root, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    folder = tmp_path_factory.mktemp("demo")
    run, data = folder / "run", thinned_root(data_root, folder / "data", "pneumoniamnist", every=4)
    code = main(["--json", "demo", "--preset", "smoke", "--data-root", str(data), "--out", str(run), "--device", "cpu",
                 "--threads", "1"])
    assert code == 0
    return run, json.loads((run / "results.json").read_text())


def test_demo_reports_every_baseline_row(demo_run) -> None:
    run, results = demo_run
    rows = results["metrics"]
    assert list(rows) == [*SITES, "ensemble (teacher)", "fedavg (one-shot)", "global (distilled)", "centralised (pooled data)"]
    assert all(set(m) == {"acc", "auc", "balanced_acc"} and 0 <= m["acc"] <= 1 for m in rows.values())
    assert (results["synthesis"], results["public_fraction"]) == ("inversion", 0.0)   # what the server used, for reviewers
    assert "synthesis inversion" in (run / "results.md").read_text()
    report = (run / "server" / "global" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in [*SITES, "ensemble (teacher)", "fedavg (one-shot)", "global (distilled)"])


def test_demo_never_selects_on_the_test_split(demo_run) -> None:
    run, results = demo_run
    report = json.loads((run / "server" / "global" / "report.json").read_text())
    assert report["selection"].startswith("last epoch") and "test" in report["selection"]
    assert results["selection"].startswith("last epoch")
    assert len(report["history"]) == report["distill"]["epochs"]  # every epoch reported, the last one kept


def test_demo_quarantines_the_tampered_bundle_and_uses_the_others(demo_run) -> None:
    run, results = demo_run
    outcomes = {o["file"]: o for o in results["outcomes"]}
    assert outcomes["0-tampered-hospital-1.sob"]["outcome"] == "quarantined"
    assert outcomes["0-tampered-hospital-1.sob"]["error"] == "BundleAuthError"
    assert [outcomes[f"{s}.sob"]["outcome"] for s in SITES] == ["accepted"] * 3
    reason = json.loads((run / "server" / outcomes["0-tampered-hospital-1.sob"]["reason_file"]).read_text())
    assert reason["file"] == "0-tampered-hospital-1.sob" and reason["error"] == "BundleAuthError"  # quarantined under a generated name
    report = json.loads((run / "server" / "global" / "report.json").read_text())
    assert [s["name"] for s in report["sites"]] == SITES


def test_demo_artifacts_and_audit_logs_hold_together(demo_run) -> None:
    run, _ = demo_run
    server_log = audit.verify_log(run / "server" / "audit.jsonl", load_public(run / "keys" / "server.pub"))
    assert [r.event.action for r in server_log] == ["ingest"] * 4 + ["distill"]
    distill_record = server_log[-1].event
    global_bytes = (run / "server" / "global" / "global.safetensors").read_bytes()
    import hashlib

    assert distill_record.details["global_sha256"] == hashlib.sha256(global_bytes).hexdigest()
    accepted_ids = {r.event.bundle_id for r in server_log if r.event.action == "ingest" and r.event.outcome == "ok"}
    assert set(distill_record.details["bundle_ids"]) == accepted_ids and len(accepted_ids) == 3
    for site in SITES:
        (export,) = audit.verify_log(run / "sites" / site / "audit.jsonl", load_public(run / "keys" / f"{site}.pub"))
        assert export.event.action == "export" and export.event.outcome == "ok" and export.event.bundle_id in accepted_ids
    assert "head.weight" in load_file(str(run / "server" / "global" / "global.safetensors"))
    assert (run / "server" / "global" / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_a_used_run_folder(demo_run, capsys) -> None:
    run, _ = demo_run
    assert main(["demo", "--preset", "smoke", "--out", str(run)]) == 3
    assert "already exists" in capsys.readouterr().err


def test_distill_command_from_the_server_folder_and_from_model_dirs(demo_run, data_root, tmp_path, capsys) -> None:  # noqa: F811
    run, _ = demo_run
    trust = str(run / "keys" / "trust.toml")
    code = main(["--json", "distill", "--server-dir", str(run / "server"), "--key", str(run / "keys" / "server.key"), "--trust", trust,
                 "--preset", "smoke", "--epochs", "1", "--out", str(tmp_path / "g1"), "--device", "cpu"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["metrics"] == {} and len(out["history"]) == 1
    log = audit.read_log(run / "server" / "audit.jsonl")
    assert log[-1].event.action == "distill" and log[-1].event.details["global_sha256"] == out["global_sha256"]

    models = [arg for s in SITES for arg in ("--model", str(run / "sites" / s / "model"))]
    code = main(["--json", "distill", *models, "--preset", "smoke", "--epochs", "1", "--out", str(tmp_path / "g2"),
                 "--eval", "pneumoniamnist", "--data-root", str(data_root), "--precision", "fp32", "--no-channels-last"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert "global (distilled)" in out["metrics"] and out["execution"]["precision"] == "fp32"


def test_distill_without_site_models_is_a_config_error(capsys) -> None:
    assert main(["distill", "--preset", "smoke"]) == 3
    assert "--server-dir" in capsys.readouterr().err


def test_the_same_pipeline_runs_on_an_rgb_eight_class_set(tmp_path: Path) -> None:
    """A generated BloodMNIST-format file (RGB, 8 classes): nothing in the pipeline assumes grey or binary."""
    write_fake_medmnist(tmp_path / "data", "bloodmnist", n_classes=8, channels=3, n=240)
    run = tmp_path / "run"
    code = main(["--json", "demo", "--preset", "smoke", "--flag", "bloodmnist", "--data-root", str(tmp_path / "data"),
                 "--out", str(run), "--alpha", "5", "--no-tamper", "--device", "cpu", "--threads", "1"])
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    assert "global (distilled)" in results["metrics"] and "fedavg (one-shot)" in results["metrics"]
    weights = load_file(str(run / "server" / "global" / "global.safetensors"))
    assert weights["features.0.weight"].shape[1] == 3 and weights["head.weight"].shape[0] == 8


def test_the_demo_epsilon_covers_every_release() -> None:
    from secure_oneshot.demo import STATS_SHARE, DemoConfig
    from secure_oneshot.errors import ConfigError

    cfg = DemoConfig(out=Path("."), dp_epsilon=8.0)
    assert cfg.resolved_stats_epsilon == pytest.approx(STATS_SHARE * 8.0)
    assert cfg.training_epsilon == pytest.approx(8.0 - STATS_SHARE * 8.0)  # DP-SGD + label histogram + threshold
    assert DemoConfig(out=Path("."), dp_epsilon=8.0, stats_epsilon=1.0).training_epsilon == pytest.approx(7.0)
    assert DemoConfig(out=Path(".")).training_epsilon is None and DemoConfig(out=Path(".")).resolved_stats_epsilon is None
    with pytest.raises(ConfigError, match="leaves nothing"):
        DemoConfig(out=Path("."), dp_epsilon=1.0, stats_epsilon=1.0)  # refused before the demo writes anything

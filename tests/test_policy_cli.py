"""The compliance-facing commands: policy check / explain / sign / verify, export and ingest, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from secure_oneshot.cli import main
from secure_oneshot.keys import save_trust_store
from secure_oneshot.policy.artifacts import load_model_dir
from secure_oneshot.policy.evaluate import ExportContext, evaluate_export
from secure_oneshot.policy.load import load_export_policy

from .conftest import NOW
from .model_helpers import make_real_model_dir as make_model_dir
from .policy_helpers import POLICIES, VECTOR_KEYS, dp_record, example_policy, load_cast

CAST = load_cast()


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def site(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    save_trust_store(CAST.site_trust(), tmp_path / "trust.toml")
    monkeypatch.setenv("SECURE_ONESHOT_TRUST", str(tmp_path / "trust.toml"))
    (tmp_path / "strict.toml").write_text(example_policy("hospital-strict.toml"))   # the commands go by the real clock
    return tmp_path


def test_explain_mixed_case_lists_every_tensor_with_the_right_decision() -> None:
    """BN statistics denied, a DP classifier allowed, a generator without DP denied, one tensor outside the allow-list."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    model = make_model_dir(root / "m", bn=True, generator=True, dp={"classifier": dp_record()}, extra={"head.extra": __import__("torch").ones(2)})
    text = (POLICIES / "hospital-strict.toml").read_text().replace('names = ["classifier/*"]', 'names = ["classifier/features.*", "classifier/head.weight"]')
    (root / "p.toml").write_text(text)
    policy = load_export_policy(root / "p.toml")
    candidate = load_model_dir(model)
    ev = evaluate_export(policy, candidate, ExportContext(NOW, (CAST.server.key_id,), 2, None))
    tensors = {d.subject: d for d in ev.decisions if d.kind == "tensor"}
    assert sorted(tensors) == sorted(candidate.tensors), "every tensor appears exactly once"
    expect = {
        "classifier/features.0.weight": (True, "tensors[0]"), "classifier/head.weight": (True, "tensors[0]"),
        "classifier/features.1.weight": (True, "tensors[0]"), "classifier/features.1.running_mean": (False, "artifacts.bn_statistics"),
        "classifier/features.1.running_var": (False, "artifacts.bn_statistics"),
        "classifier/features.1.num_batches_tracked": (False, "artifacts.bn_statistics"),
        "classifier/head.bias": (False, "tensors"), "classifier/head.extra": (False, "structure"),
        "generator/conv_in.weight": (False, "artifacts.generator"),
    }
    for name, (allowed, rule) in expect.items():
        assert (tensors[name].allowed, tensors[name].rule) == (allowed, rule), name


def test_policy_check_cli(site: Path, capsys) -> None:
    code, out, _ = run(capsys, "policy", "check", "strict.toml")
    assert code == 0 and "valid site export policy st-example/strict v1" in out
    (site / "bad.toml").write_text((site / "strict.toml").read_text().replace("valid_days = 7", "valid_dayz = 7"))
    code, _, err = run(capsys, "policy", "check", "bad.toml")
    assert code == 3 and "bad.toml:" in err and "bundle.valid_dayz: unknown key" in err


def test_policy_sign_and_verify_cli(site: Path, capsys) -> None:
    code, out, err = run(capsys, "policy", "verify", "strict.toml")
    assert code == 7 and "0 valid approval(s), 2 required" in err
    for who in ("dpo", "ciso"):
        assert run(capsys, "policy", "sign", "strict.toml", "--key", VECTOR_KEYS / f"{who}.key")[0] == 0
    code, out, _ = run(capsys, "--json", "policy", "verify", "strict.toml")
    assert code == 0 and json.loads(out)["valid"] == 2


def test_policy_explain_cli_json_and_table(site: Path, capsys) -> None:
    make_model_dir(site / "model", bn=True, dp={"classifier": dp_record()})
    code, out, _ = run(capsys, "policy", "explain", "--policy", "strict.toml", "--model", "model")
    assert code == 0 and "export would be refused" in out and "DENY" in out and "classifier/features.1.running_mean" in out
    assert "metadata (what of the model record goes into the signed manifest)" in out
    assert "SEND    artifacts.classifier.architecture" in out
    code, out, _ = run(capsys, "--json", "policy", "explain", "--policy", "strict.toml", "--model", "model", "--without", "bn_statistics")
    data = json.loads(out)
    assert not any(d["subject"].endswith("running_mean") for d in data["decisions"])
    denied = [d for d in data["decisions"] if not d["allowed"]]
    assert [d["rule"] for d in denied] == ["approval.required"]  # explain does not see signatures here: none were made


def test_export_and_ingest_cli_round_trip(site: Path, capsys) -> None:
    for who in ("dpo", "ciso"):
        run(capsys, "policy", "sign", "strict.toml", "--key", VECTOR_KEYS / f"{who}.key")
    make_model_dir(site / "model", bn=True, dp={"classifier": dp_record()})
    args = ["export", "--model", "model", "--policy", "strict.toml", "--key", VECTOR_KEYS / "site-a.key",
            "--to", VECTOR_KEYS / "server.pub", "--out", "server/inbox/site-a.sob", "--audit", "audit.jsonl"]
    (site / "server" / "inbox").mkdir(parents=True)
    code, _, err = run(capsys, *args)
    assert code == 7 and "bn_statistics" in err and "DENY" in err and not (site / "server/inbox/site-a.sob").exists()
    code, out, _ = run(capsys, *args, "--without", "bn_statistics", "--dry-run")
    assert code == 0 and "DRY RUN" in out and not (site / "server/inbox/site-a.sob").exists()
    code, out, _ = run(capsys, *args, "--without", "bn_statistics")
    assert code == 0 and "SENT" in out and (site / "server/inbox/site-a.sob").exists()
    code, out, _ = run(capsys, "audit", "verify", "audit.jsonl", "--signer", VECTOR_KEYS / "site-a.pub")
    assert code == 0 and "2 records" in out
    shutil.copy(VECTOR_KEYS / "trust.toml", site / "server-trust.toml")
    code, out, _ = run(capsys, "ingest", "--server-dir", "server", "--policy", POLICIES / "server-ingest.toml",
                       "--key", VECTOR_KEYS / "server.key", "--trust", "server-trust.toml")
    assert code == 0 and "1 accepted" in out

"""The transfer path imports no ML library: each command runs in a fresh interpreter and its modules are checked.

Fixtures are real and small: the test-vector identities, a signed research policy, a small-cnn (GroupNorm)
model directory whose safetensors are written by NumPy, a bundle exported from it, an inbox ingested, an
audit log verified.  ``python -m secure_oneshot`` is checked to behave as the ``secure-oneshot`` script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from secure_oneshot.keys import save_trust_store
from secure_oneshot.policy.load import load_export_policy
from secure_oneshot.policy.signatures import sign_policy
from secure_oneshot.models.specs import classifier_layout

from .policy_helpers import POLICIES, VECTOR_KEYS, example_policy, load_cast

HEAVY = ("torch", "torchvision", "diffusers", "opacus", "sklearn", "scipy", "matplotlib", "pandas", "medmnist", "kymatio")

# Runs the CLI in-process in a fresh interpreter, then writes the heavy modules that were imported (and the exit code).
PROBE = """
import json, sys
from secure_oneshot.cli import main
report, argv = sys.argv[1], sys.argv[2:]
try:
    code = main(argv)
except SystemExit as stop:
    code = stop.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(%r))
watched = sorted(set(sys.modules) & set(%r))
with open(report, "w") as f:
    json.dump({"code": code, "heavy": heavy, "numpy": "numpy" in sys.modules, "watched": watched}, f)
""" % (HEAVY, ("sqlite3", "secure_oneshot.bundle.seal", "secure_oneshot.bundle.ledger", "traceback"))


def probe(cwd: Path, *argv: str | os.PathLike[str]) -> dict:
    report = cwd / "probe.json"
    env = {**os.environ, "SECURE_ONESHOT_TRUST": str(cwd / "site-trust.toml"), "OMP_NUM_THREADS": "1"}
    env.pop("SECURE_ONESHOT_PASSPHRASE", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(report), *map(str, argv)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    result["out"], result["err"] = done.stdout, done.stderr
    return result


def write_model_dir(root: Path) -> Path:
    """A small-cnn (GroupNorm) classifier of random float32 weights, saved by safetensors.numpy."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    layout = classifier_layout("small-cnn", 1, 2, "group")
    tensors = {name: rng.standard_normal(e.shape).astype(np.float32) for name, e in layout.entries.items()}
    save_file(tensors, str(root / "classifier.safetensors"))
    meta = {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2, "norm": "group", "image_size": 28}
    record = {"format": "secure-oneshot-model/v1", "site": "site-a", "artifacts": {"classifier": meta}, "dp": {}, "training": {"epochs": 1}}
    (root / "record.json").write_text(json.dumps(record))
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lean")
    save_trust_store(load_cast().site_trust(), root / "site-trust.toml")
    shutil.copy(VECTOR_KEYS / "trust.toml", root / "server-trust.toml")
    # The commands check the policy's validity by the real clock: an expiry after today, not the example's own.
    (root / "policy.toml").write_text(example_policy("research-study.toml"))
    shutil.copy(POLICIES / "server-ingest.toml", root / "ingest.toml")
    (root / "signed-policy.toml").write_text(example_policy("research-study.toml"))
    sign_policy(load_export_policy(root / "signed-policy.toml"), root / "signed-policy.toml", load_cast().dpo)
    write_model_dir(root / "model")
    (root / "server" / "inbox").mkdir(parents=True)
    return root


def assert_lean(result: dict, code: int = 0, numpy: bool = True) -> None:
    """Exit ``code``, no ML library; and no NumPy either where ``numpy`` is False (commands that hold no tensors)."""
    assert result["code"] == code, result["err"]
    assert result["heavy"] == [], f"imported {result['heavy']}"
    assert numpy or not result["numpy"], "imported NumPy without a tensor to handle"


def test_version_and_help_import_nothing_heavy(site: Path) -> None:
    result = probe(site, "--version")
    assert_lean(result, numpy=False)
    assert result["out"].startswith("secure-oneshot ")
    result = probe(site, "--help")
    assert_lean(result, numpy=False)
    assert "distill" in result["out"] and "export" in result["out"] and "audit-privacy" in result["out"]


@pytest.mark.parametrize("argv", [["keys", "--help"], ["inspect", "--help"], ["export", "--help"], ["ingest", "--help"],
                                  ["audit", "verify", "--help"], ["policy", "check", "--help"]])
def test_transfer_command_help_imports_nothing_heavy(site: Path, argv: list[str]) -> None:
    result = probe(site, *argv)
    assert_lean(result, numpy=False)
    assert "usage: secure-oneshot" in result["out"]


def test_the_transfer_path_end_to_end_imports_nothing_heavy(site: Path) -> None:
    """keys, policy, export, inspect, verify, open, seal, ingest, audit: each in its own interpreter."""
    assert_lean(probe(site, "keys", "new", "--name", "spare", "--out", "spare-keys", "--insecure-no-passphrase"), numpy=False)
    assert_lean(probe(site, "keys", "show", VECTOR_KEYS / "server.pub"), numpy=False)
    assert_lean(probe(site, "policy", "check", "policy.toml"), numpy=False)
    assert_lean(probe(site, "policy", "sign", "policy.toml", "--key", VECTOR_KEYS / "dpo.key"), numpy=False)
    assert_lean(probe(site, "policy", "verify", "policy.toml"), numpy=False)
    assert_lean(probe(site, "policy", "explain", "--policy", "policy.toml", "--model", "model"))
    export = ["export", "--model", "model", "--policy", "policy.toml", "--key", VECTOR_KEYS / "site-a.key",
              "--to", VECTOR_KEYS / "server.pub", "--audit", "audit.jsonl"]
    assert_lean(probe(site, *export, "--out", "server/inbox/site-a.sob"))
    bundle = site / "server" / "inbox" / "site-a.sob"
    assert bundle.is_file()
    assert_lean(probe(site, "inspect", bundle), numpy=False)
    server = ["--key", VECTOR_KEYS / "server.key", "--trust", "server-trust.toml"]
    verified = probe(site, "--json", "verify", bundle, *server)
    assert_lean(verified, numpy=False)   # the value checks of a small payload read the bytes (bundle/finite_bits.py)
    assert json.loads(verified["out"])["tensors"]["classifier/head.weight"] == {"dtype": "float32", "shape": [2, 128]}
    assert_lean(probe(site, "open", bundle, *server, "--out", "payload.safetensors"))
    assert_lean(probe(site, "seal", "payload.safetensors", "--key", VECTOR_KEYS / "site-a.key", "--to", VECTOR_KEYS / "server.pub",
                      "--out", "resealed.sob"), numpy=False)
    ingested = probe(site, "ingest", "--server-dir", "server", "--policy", "ingest.toml", *server)
    assert_lean(ingested)
    assert "1 accepted" in ingested["out"]
    assert_lean(probe(site, "audit", "verify", "audit.jsonl", "--signer", VECTOR_KEYS / "site-a.pub"), numpy=False)
    assert_lean(probe(site, "audit", "verify", "server/audit.jsonl", "--signer", VECTOR_KEYS / "server.pub"), numpy=False)


def test_verify_and_inspect_load_neither_the_writer_nor_sqlite(site: Path, tmp_path: Path) -> None:
    """Start-up cost of the commands hospital IT runs most: no sealing code, no SQLite without --ledger, no traceback."""
    bundle = tmp_path / "check.sob"
    assert_lean(probe(site, "seal", site / "model" / "classifier.safetensors", "--key", VECTOR_KEYS / "site-a.key",
                      "--to", VECTOR_KEYS / "server.pub", "--out", bundle))
    inspected = probe(site, "inspect", bundle)
    assert_lean(inspected, numpy=False)
    assert inspected["watched"] == []
    verified = probe(site, "verify", bundle, "--key", VECTOR_KEYS / "server.key", "--trust", "server-trust.toml")
    assert_lean(verified)
    assert verified["watched"] == []
    with_ledger = probe(site, "verify", bundle, "--key", VECTOR_KEYS / "server.key", "--trust", "server-trust.toml",
                        "--ledger", tmp_path / "ledger.sqlite")
    assert with_ledger["code"] == 0 and "sqlite3" in with_ledger["watched"], with_ledger


def test_a_refused_export_is_an_error_and_still_lean(site: Path) -> None:
    """The error path too: a recipient the policy does not allow (outsider) is refused with exit 7."""
    result = probe(site, "export", "--model", "model", "--policy", "policy.toml", "--key", VECTOR_KEYS / "site-a.key",
                   "--to", VECTOR_KEYS / "outsider.pub", "--audit", "refused.jsonl", "--out", "refused.sob")
    assert_lean(result, code=7)
    assert "Traceback" not in result["err"] and not (site / "refused.sob").exists()


def test_python_dash_m_is_the_cli(site: Path) -> None:
    """``python -m secure_oneshot`` prints, and exits, exactly as the ``secure-oneshot`` script does."""
    script = shutil.which("secure-oneshot") or pytest.skip("the secure-oneshot script is not installed")

    def both(*argv: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        kwargs = {"cwd": site, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "timeout": 120, "stdin": subprocess.DEVNULL}
        return (subprocess.run([sys.executable, "-m", "secure_oneshot", *argv], **kwargs), subprocess.run([script, *argv], **kwargs))

    for argv in (["--version"], ["inspect", "no-such.sob"], ["no-such-command"], ["inspect", "server/inbox/site-a.sob"]):
        module, command = both(*argv)
        assert (module.returncode, module.stdout, module.stderr) == (command.returncode, command.stdout, command.stderr), argv
    module, _ = both("--version")
    assert module.returncode == 0 and module.stdout.startswith("secure-oneshot 0.")
    module, _ = both("inspect", "no-such.sob")
    assert module.returncode == 5 and module.stderr.startswith("secure-oneshot: error: ") and "Traceback" not in module.stderr


# Recomputing a DP claim runs Opacus's own accounting code, whose analysis imports SciPy (scipy.special for RDP;
# scipy.integrate, scipy.fft and scipy.signal for PRV): the one library DP artifacts may add, measured in
# benchmarks/RESULTS.md.  Opacus's files are loaded under a private package name (policy/opacus_accounting.py),
# so "opacus" itself never appears in sys.modules and neither does torch.
DP_EXCEPTION = ["scipy"]


def test_export_and_ingest_of_a_dp_bundle_import_no_torch(site: Path, tmp_path: Path) -> None:
    """export (epsilon recomputed by the site's gate), policy explain, inspect and ingest (recomputed again by the
    server) of a model with a DP record: SciPy is the only heavy library, and the claim was really checked."""
    from .policy_helpers import dp_record

    model = write_model_dir(tmp_path / "dp-model")
    record = json.loads((model / "record.json").read_text())
    record["dp"] = {"classifier": dp_record().to_json()}
    (model / "record.json").write_text(json.dumps(record))
    inbox = tmp_path / "server" / "inbox"
    inbox.mkdir(parents=True)
    result = probe(site, "export", "--model", model, "--policy", "signed-policy.toml", "--key", VECTOR_KEYS / "site-a.key",
                   "--to", VECTOR_KEYS / "server.pub", "--audit", "dp-audit.jsonl", "--out", inbox / "dp.sob")
    assert result["code"] == 0, result["err"]
    assert result["heavy"] == DP_EXCEPTION, f"imported {result['heavy']}"
    explained = probe(site, "policy", "explain", "--policy", "signed-policy.toml", "--model", model)
    assert explained["code"] == 0 and explained["heavy"] == DP_EXCEPTION, explained
    assert_lean(probe(site, "inspect", inbox / "dp.sob"), numpy=False)
    ingested = probe(site, "ingest", "--server-dir", tmp_path / "server", "--policy", "ingest.toml",
                     "--key", VECTOR_KEYS / "server.key", "--trust", "server-trust.toml")
    assert ingested["code"] == 0 and ingested["heavy"] == DP_EXCEPTION, ingested
    assert "1 accepted" in ingested["out"]


def test_a_forged_dp_claim_is_refused_without_torch(site: Path, tmp_path: Path) -> None:
    """The lean accountants really run: an understated epsilon is refused (exit 8) by export, still without torch."""
    from .policy_helpers import dp_record

    model = write_model_dir(tmp_path / "forged-model")
    record = json.loads((model / "record.json").read_text())
    forged = dp_record().to_json()
    forged["epsilon"] = repr(float(forged["epsilon"]) / 2)
    record["dp"] = {"classifier": forged}
    (model / "record.json").write_text(json.dumps(record))
    result = probe(site, "export", "--model", model, "--policy", "signed-policy.toml", "--key", VECTOR_KEYS / "site-a.key",
                   "--to", VECTOR_KEYS / "server.pub", "--audit", "forged-audit.jsonl", "--out", tmp_path / "forged.sob")
    assert result["code"] == 8, result["err"]
    assert "may be forged" in result["err"] and "Traceback" not in result["err"]
    assert result["heavy"] == DP_EXCEPTION, f"imported {result['heavy']}"
    assert not (tmp_path / "forged.sob").exists()

"""CPU time and peak memory of each transfer-path command, beside a bare interpreter and ``import torch``.

Every command runs in a fresh interpreter (``python -m secure_oneshot ...``);
its user + system CPU time and peak RSS come from ``os.wait4`` (the child's own
rusage).  A forked child's peak RSS starts from its parent's, so the measuring
process imports only the standard library and builds the fixtures in a child
of its own.  Each row is the minimum of ``--runs`` runs.
Prints a Markdown table.

Bytecode: this checkout's environment sets ``PYTHONDONTWRITEBYTECODE=1``, so
every run would compile the project's modules from source (about 0.05 CPU-s
for ``verify``), a cost an installed package (pip byte-compiles wheels) does
not pay.  By default the children therefore get a private bytecode cache
(``PYTHONPYCACHEPREFIX`` in the temporary folder) and one unmeasured warm-up
run per row; ``--no-bytecode-cache`` measures the compile-every-time case.

Fixtures, built once in a temporary folder: the public test-vector identities
(tests/vectors/keys) and the research policy (policies/research-study.toml,
signed by the test ``dpo`` key), a demo-sized model directory (small-cnn, as
``secure-oneshot demo --preset cpu`` trains; no DP record), a ``resnet18-cifar``
one (45 MB), two small-cnn ones with a DP record (RDP and PRV accountant, whose
epsilon export and ingest recompute), and a 10 MB safetensors file sealed to the server for
``inspect`` / ``verify``.  ``export`` writes a new bundle each run;
``ingest`` gets a fresh server folder with one bundle in its inbox each run.

    OMP_NUM_THREADS=1 python benchmarks/cli_latency.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTOR_KEYS = ROOT / "tests" / "vectors" / "keys"
MiB = 1 << 20


def measure(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(user + system CPU seconds, peak RSS in MiB, exit code) of one child process."""
    child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    stderr = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode not in (0,):
        raise SystemExit(f"{' '.join(argv)} exited with {child.returncode}: {stderr.decode(errors='replace')[-2000:]}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, child.returncode


def write_model(folder: Path, architecture: str, accountant: str | None = None) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    from secure_oneshot.models.specs import classifier_layout

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    layout = classifier_layout(architecture, 1, 2, "group")
    save_file({n: rng.standard_normal(e.shape).astype(np.float32) for n, e in layout.entries.items()}, str(folder / "classifier.safetensors"))
    meta = {"architecture": architecture, "in_channels": 1, "num_classes": 2, "norm": "group", "image_size": 28}
    record = {"format": "secure-oneshot-model/v1", "site": "site-a", "artifacts": {"classifier": meta}, "dp": {}, "training": {"epochs": 1}}
    if accountant is not None:  # a DP record as DP-SGD training writes it (1000 steps, sigma 1.1, q 0.01)
        from secure_oneshot.policy.dp import DpRecord, compute_epsilon

        history = ((1.1, 0.01, 1000),)
        record["dp"] = {"classifier": DpRecord(accountant, history, 1e-5, compute_epsilon(accountant, history, 1e-5), 1.0, "poisson",
                                               "sha256:site-a-train", {"opacus": "1.6.0"}).to_json()}
    (folder / "record.json").write_text(json.dumps(record))
    return folder


def copy_keys(work: Path) -> Path:
    """The test-vector keys, copied with their private files at mode 0600 (a checkout leaves them 0644, which the CLI refuses)."""
    keys = work / "keys"
    shutil.copytree(VECTOR_KEYS, keys)
    for key in keys.glob("*.key"):
        key.chmod(0o600)
    return keys


def build_fixtures(work: Path, cli: list[str], env: dict[str, str]) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from secure_oneshot.keys import TrustEntry, TrustStore, load_public, save_trust_store

    keys = work / "keys"   # copied by the parent (copy_keys)
    site_trust = TrustStore()
    for name, roles in (("server", {"recipient"}), ("dpo", {"approver"})):
        site_trust = site_trust.with_entry(TrustEntry(load_public(keys / f"{name}.pub"), frozenset(roles)))
    save_trust_store(site_trust, work / "site-trust.toml")
    shutil.copy(keys / "trust.toml", work / "server-trust.toml")
    shutil.copy(ROOT / "policies" / "research-study.toml", work / "policy.toml")
    shutil.copy(ROOT / "policies" / "server-ingest.toml", work / "ingest.toml")
    subprocess.run([*cli, "policy", "sign", "policy.toml", "--key", str(keys / "dpo.key")], cwd=work, env=env, check=True, capture_output=True)
    write_model(work / "demo-model", "small-cnn")
    write_model(work / "resnet-model", "resnet18-cifar")
    write_model(work / "dp-rdp-model", "small-cnn", "rdp")
    write_model(work / "dp-prv-model", "small-cnn", "prv")
    save_file({"w": np.random.default_rng(1).standard_normal(10 * MiB // 4).astype(np.float32)}, str(work / "ten.safetensors"))
    subprocess.run([*cli, "seal", "ten.safetensors", "--key", str(keys / "site-a.key"), "--to", str(keys / "server.pub"),
                    "--out", "ten.sob"], cwd=work, env=env, check=True, capture_output=True)
    for model in ("demo-model", "resnet-model", "dp-rdp-model", "dp-prv-model"):
        subprocess.run([*cli, *export_args(model, f"{model}.sob")], cwd=work, env=env, check=True, capture_output=True)


def export_args(model: str, out: str) -> list[str]:
    return ["export", "--model", model, "--policy", "policy.toml", "--key", "keys/site-a.key", "--to", "keys/server.pub",
            "--audit", "audit.jsonl", "--out", out]


def fresh_inbox(work: Path, bundle: str) -> Callable[[int], None]:
    def prepare(run: int) -> None:
        server = work / "server"
        shutil.rmtree(server, ignore_errors=True)
        (server / "inbox").mkdir(parents=True)
        shutil.copy(work / bundle, server / "inbox" / bundle)
    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command; the minimum is reported (default 5)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="let every run compile the project's modules from source (as PYTHONDONTWRITEBYTECODE=1 does)")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run each secure-oneshot row with this checkout's code (PYTHONPATH), alternating run by run")
    parser.add_argument("--only", metavar="TEXT", help="measure only the rows whose label contains TEXT")
    parser.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)   # internal: build the fixtures in DIR
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SECURE_ONESHOT_PASSPHRASE", None)
    cli = [sys.executable, "-m", "secure_oneshot"]
    if args.build:
        build_fixtures(Path(args.build), cli, env)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = copy_keys(work)
        server = ["--key", str(keys / "server.key"), "--trust", "server-trust.toml"]
        env["SECURE_ONESHOT_TRUST"] = str(work / "site-trust.toml")
        subprocess.run([sys.executable, __file__, "--build", str(work)], env=env, check=True)
        if not args.no_bytecode_cache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        rows: list[tuple[str, list[str], Callable[[int], None] | None]] = [
            ("`python -c pass`", [sys.executable, "-c", "pass"], None),
            ("`python -c \"import torch\"`", [sys.executable, "-c", "import torch"], None),
            ("`--version`", [*cli, "--version"], None),
            ("`--help`", [*cli, "--help"], None),
            ("`keys show`", [*cli, "keys", "show", str(keys / "server.pub")], None),
            ("`policy check`", [*cli, "policy", "check", "policy.toml"], None),
            ("`inspect` (10 MB bundle)", [*cli, "inspect", "ten.sob"], None),
            ("`verify` (10 MB bundle)", [*cli, "verify", "ten.sob", *server], None),
            ("`audit verify`", [*cli, "audit", "verify", "audit.jsonl", "--signer", str(keys / "site-a.pub")], None),
            ("`export` (small-cnn, demo size)", [*cli, *export_args("demo-model", "out-demo.sob")], None),
            ("`ingest` (small-cnn bundle)", [*cli, "ingest", "--server-dir", "server", "--policy", "ingest.toml", *server],
             fresh_inbox(work, "demo-model.sob")),
            ("`export` (resnet18-cifar, 45 MB)", [*cli, *export_args("resnet-model", "out-resnet.sob")], None),
            ("`ingest` (resnet18-cifar bundle)", [*cli, "ingest", "--server-dir", "server", "--policy", "ingest.toml", *server],
             fresh_inbox(work, "resnet-model.sob")),
            ("`export` (small-cnn, DP record, rdp)", [*cli, *export_args("dp-rdp-model", "out-dp-rdp.sob")], None),
            ("`ingest` (small-cnn, DP record, rdp)", [*cli, "ingest", "--server-dir", "server", "--policy", "ingest.toml", *server],
             fresh_inbox(work, "dp-rdp-model.sob")),
            ("`export` (small-cnn, DP record, prv)", [*cli, *export_args("dp-prv-model", "out-dp-prv.sob")], None),
            ("`ingest` (small-cnn, DP record, prv)", [*cli, "ingest", "--server-dir", "server", "--policy", "ingest.toml", *server],
             fresh_inbox(work, "dp-prv-model.sob")),
        ]
        rows = [row for row in rows if args.only is None or args.only in row[0]]
        sizes = {name: (work / f"{name}.sob").stat().st_size for name in ("ten", "demo-model", "resnet-model")}
        print(f"bundles: 10 MB {sizes['ten']} bytes, small-cnn {sizes['demo-model']} bytes, resnet18-cifar {sizes['resnet-model']} bytes; "
              f"min of {args.runs} runs; bytecode {'compiled every run' if args.no_bytecode_cache else 'cached'}\n")
        print("| command | CPU s (user+sys) | peak RSS MiB |")
        print("| --- | ---: | ---: |")
        versions = {"": env}
        if args.baseline:
            versions[" (baseline)"] = {**env, "PYTHONPATH": str(Path(args.baseline).resolve())}
        for label, argv, prepare in rows:
            ours = argv[:3] == cli
            samples: dict[str, list[tuple[float, float]]] = {suffix: [] for suffix in (versions if ours else [""])}
            for run in range(-1 if not args.no_bytecode_cache else 0, args.runs):   # run -1: warm-up, fills the bytecode cache
                for suffix in samples:
                    if prepare is not None:
                        prepare(run)
                    cpu, rss, _ = measure(argv, work, versions[suffix])
                    if run >= 0:
                        samples[suffix].append((cpu, rss))
            for suffix, taken in samples.items():
                print(f"| {label}{suffix} | {min(s[0] for s in taken):.3f} | {min(s[1] for s in taken):.0f} |", flush=True)


if __name__ == "__main__":
    main()

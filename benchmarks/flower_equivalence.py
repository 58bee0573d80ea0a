"""Does the Flower app change what the study learns?  The file-based demo against Flower's simulation engine.

Runs the 5-hospital demo with the ``smoke`` preset once through files (``demo.run_demo``: export, copy into the
inbox, ingest, distil), then moves the SAME trained site model directories through Flower's simulation engine
(``flwr.simulation.run_simulation``: the ClientApp exports at each virtual SuperNode, the ServerApp ingests and
distils with the same preset and seed), and compares:

- the accepted bundles' contents: per site, the decrypted tensors (same names, dtypes, shapes and bytes) and the
  signed manifest's statements (``meta``, ``dp``, policy id and hash), except what records the request and the
  time of the export (``meta.request_id``, ``meta.privacy_statement.provenance.exported`` / ``.expires``);
- the policy decisions: each site's export audit outcome and policy, and each bundle's ingest outcome;
- the distilled global model's state dict, bit for bit.

Bundle bytes differ by design (fresh file keys, nonces, ids, times): contents are compared, not ciphertexts.
Deterministic settings: CPU, one thread, ``SECURE_ONESHOT_CALIBRATE=off``.  Needs the MedMNIST data
(``SECURE_ONESHOT_DATA``) and the ``flower`` extra with Ray.

    python benchmarks/flower_equivalence.py [--out DIR] [--sites 5] [--seed 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("SECURE_ONESHOT_CALIBRATE", "off")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


EXPORT_TIMES = ("exported", "expires")   # meta.privacy_statement.provenance fields that record the export's time


def _contents(server_dir: Path, run: Path) -> dict[str, dict[str, Any]]:
    """Per sender name: the decrypted tensors and the signed statements of its accepted bundle."""
    from secure_oneshot.keys import load_identity, load_trust_store
    from secure_oneshot.server.accepted import open_accepted
    from secure_oneshot.server.ingest import IngestFolders

    identity = load_identity(run / "keys" / "server.key", None)
    out = {}
    for bundle in open_accepted(IngestFolders.under(server_dir), identity, load_trust_store(run / "keys" / "trust.toml")):
        opened = bundle.opened
        meta = json.loads(json.dumps({k: v for k, v in opened.manifest.meta.items() if k != "request_id"}))
        provenance = meta.get("privacy_statement", {}).get("provenance", {})
        for when in EXPORT_TIMES:   # when the export ran, like the header's created/expires: differs by design
            provenance.pop(when, None)
        out[opened.sender.name] = {
            "tensors": {n: (str(a.dtype), tuple(a.shape), a.tobytes()) for n, a in opened.tensors.items()},
            "statements": json.dumps({"meta": meta, "dp": opened.manifest.dp, "policy_id": opened.manifest.policy_id,
                                      "policy_sha256": opened.manifest.policy_sha256}, sort_keys=True)}
    return out


def _export_decisions(run: Path, names: list[str], ids) -> dict[str, list]:
    from secure_oneshot import audit

    return {n: [(e.outcome, e.policy_id, e.policy_version, e.policy_sha256, e.reason.split(" (")[0])
                for e in (r.event for r in audit.verify_log(run / "sites" / n / "audit.jsonl", ids[n].public)) if e.action == "export"]
            for n in names}


def _state(path: Path) -> dict[str, tuple]:
    from safetensors.numpy import load_file

    return {k: (str(v.dtype), v.shape, v.tobytes()) for k, v in load_file(str(path)).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from flwr.simulation import run_simulation

    from secure_oneshot.demo import DemoConfig, run_demo
    from secure_oneshot.integrations.flower.client_app import app as client_app
    from secure_oneshot.integrations.flower.server_app import SERVER_CONFIG_ENV
    from secure_oneshot.integrations.flower.server_app import app as server_app
    from secure_oneshot.integrations.flower.site import SIMULATION_SITES_ENV
    from secure_oneshot.keys import load_identity

    root = args.out or Path(tempfile.mkdtemp(prefix="flower-equivalence-"))
    files, flower = root / "files", root / "flower"
    t0 = time.perf_counter()
    result = run_demo(DemoConfig(out=files, preset="smoke", sites=args.sites, seed=args.seed, tamper=False, centralised=False,
                                 data_root=os.environ.get("SECURE_ONESHOT_DATA")), say=lambda line: None)
    t_files = time.perf_counter() - t0
    names = [f"hospital-{i + 1}" for i in range(args.sites)]
    ids = {n: load_identity(files / "keys" / f"{n}.key", None) for n in names}

    # the Flower run: the same keys, policies and trained model directories; its own outboxes, audit logs and server
    sites_dir = flower / "site-settings"
    sites_dir.mkdir(parents=True)
    for i, name in enumerate(names):
        site = flower / "sites" / name
        (sites_dir / f"site-{i}.toml").write_text(
            f'model_dir = "{files}/sites/{name}/model"\npolicy = "{files}/policies/site-export.toml"\n'
            f'key = "{files}/keys/{name}.key"\ntrust = "{files}/keys/trust.toml"\nrecipients = ["{files}/keys/server.pub"]\n'
            f'audit_log = "{site}/audit.jsonl"\noutbox = "{site}/outbox"\n')
    server_config = flower / "flower-server.toml"
    server_config.write_text(f'server_dir = "{flower}/server"\nkey = "{files}/keys/server.key"\ntrust = "{files}/keys/trust.toml"\n'
                             f'ingest_policy = "{files}/policies/server-ingest.toml"\nnodes = {args.sites}\nwait_seconds = 60\n'
                             f'reply_seconds = 600\ndistill = true\ndistill_preset = "smoke"\n')
    os.environ[SIMULATION_SITES_ENV], os.environ[SERVER_CONFIG_ENV] = str(sites_dir), str(server_config)
    t0 = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    t_flower = time.perf_counter() - t0
    report = json.loads((flower / "server" / "flower-round.json").read_text())

    a, b = _contents(files / "server", files), _contents(flower / "server", files)
    same_sites = sorted(a) == sorted(b)
    same_tensors = same_sites and all(a[n]["tensors"] == b[n]["tensors"] for n in a)
    same_statements = same_sites and all(a[n]["statements"] == b[n]["statements"] for n in a)
    files_ingest = sorted((o.sender_name if hasattr(o, "sender_name") else o.sender, o.outcome) for o in result.outcomes)
    flower_ingest = sorted((r["ingest"].get("sender"), r["ingest"].get("outcome")) for r in report["results"])
    same_export = _export_decisions(files, names, ids) == _export_decisions(flower, names, ids)
    same_ingest = files_ingest == flower_ingest
    ga, gb = _state(Path(result.paths["global_model"])), _state(Path(report["distilled"]) / "global.safetensors")
    same_global = ga.keys() == gb.keys() and all(ga[k] == gb[k] for k in ga)
    summary = {"sites": args.sites, "seed": args.seed, "accepted_files": len(a), "accepted_flower": len(b),
               "flower_counts": report["counts"], "same_accepted_sites": same_sites,
               "same_tensors": same_tensors, "tensors_per_site": {n: len(a[n]["tensors"]) for n in sorted(a)},
               "same_signed_statements": same_statements, "same_export_decisions": same_export, "same_ingest_decisions": same_ingest,
               "ingest_files": files_ingest, "ingest_flower": flower_ingest,
               "same_global_state_dict": same_global, "global_tensors": len(ga),
               "seconds_files_demo": round(t_files, 1), "seconds_flower_round": round(t_flower, 1), "out": str(root)}
    print(json.dumps(summary, indent=2))
    ok = same_tensors and same_statements and same_export and same_ingest and same_global and len(a) == args.sites
    if args.out is None and ok:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Five hospitals of different architectures through the real pipeline; the global model against its ensemble.

    python benchmarks/mixed_architectures.py OUT [ARCH,ARCH,...] [SEED]
    python benchmarks/mixed_architectures.py /tmp/mixed small-cnn,small-cnn,resnet18-cifar,resnet18-cifar,vgg11-bn 0

Each hospital trains its own architecture with the ``cpu`` training preset on its part of PneumoniaMNIST
(Dirichlet alpha 0.5, as the demo), exports a policy-checked signed encrypted bundle, the server ingests every
bundle and distils with the ``cpu`` server preset (the student is the first site's architecture).  Prints every
site's, the ensemble's and the global model's test metrics, the gap between global and ensemble AUC, and the
wall time of each step.  One torch thread; $SECURE_ONESHOT_DATA names the MedMNIST folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from secure_oneshot.client.site import run_site
from secure_oneshot.client.site_config import SiteConfig
from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.demo import DemoConfig, _data_config, _site_train_config, create_identities, demo_partition, \
    export_all, write_policies
from secure_oneshot.keys import load_identity, load_trust_store
from secure_oneshot.models.classifier import ARCHITECTURES, ClassifierConfig
from secure_oneshot.policy.load import load_ingest_policy
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.ingest import IngestFolders, ingest_inbox
from secure_oneshot.server.study import DistillJob, load_accepted, run_distillation

DEFAULT = "small-cnn,small-cnn,resnet18-cifar,resnet18-cifar,vgg11-bn"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="run folder to create (must not exist)")
    parser.add_argument("architectures", nargs="?", default=DEFAULT, help=f"one architecture per hospital, comma-separated (default {DEFAULT})")
    parser.add_argument("seed", nargs="?", type=int, default=0, help="partition and training seed (default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="OUT is an earlier run of this script: keep its trained sites and accepted bundles and continue "
                             "its distillation from the newest complete epoch checkpoint")
    args = parser.parse_args(argv)
    run, architectures, seed = args.out, args.architectures.split(","), args.seed
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the benchmark's keys are not passphrase-protected; Opacus/torch notices
    cfg = DemoConfig(out=run, data_root=os.environ.get("SECURE_ONESHOT_DATA"), preset="cpu", sites=len(architectures), seed=seed,
                     execution=Execution(device="cpu"))
    preset = cfg.resolved_preset()
    names = [f"hospital-{i + 1}" for i in range(len(architectures))]
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()
    if args.resume:
        server_id = load_identity(run / "keys" / "server.key", None)
        distil(run, cfg, seed, load_trust_store(run / "keys" / "trust.toml"), server_id, architectures, seconds, started, resume=True)
        return
    run.mkdir(parents=True, exist_ok=False)
    ids, trust_file = create_identities(run, names)
    export_policy, ingest_policy = write_policies(run, ids, names)
    # The demo's ingest policy lists the architectures the demo trains; this study adds the others it names.
    listed = ", ".join(f'"{a}"' for a in sorted(ARCHITECTURES))
    ingest_policy.write_text(ingest_policy.read_text().replace("architectures = [", f"architectures = [{listed}, ", 1))
    partition = demo_partition(cfg, preset, run)
    dirs = []
    for i, (name, arch) in enumerate(zip(names, architectures)):
        site_cfg = SiteConfig(_data_config(cfg, partition, i), ClassifierConfig(arch), _site_train_config(cfg, preset, seed + i), None, None,
                              run / "sites" / name / "model")
        t = time.perf_counter()
        result = run_site(site_cfg).classifier
        test = result.metrics.get("test", {})
        print(f"{name} {arch}: {len(result.data.train)} records, test ACC {test.get('acc', float('nan')):.3f} "
              f"AUC {test.get('auc', float('nan')):.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
        seconds[f"train {name} {arch}"] = round(time.perf_counter() - t, 1)
        dirs.append(site_cfg.out)
    seconds["train"], clock = round(time.perf_counter() - clock, 1), time.perf_counter()
    server = IngestFolders.under(run / "server")
    export_all(names, dirs, ids, export_policy, trust_file, server.inbox, run, print)
    outcomes = ingest_inbox(server, ids["server"], load_trust_store(trust_file), load_ingest_policy(ingest_policy))
    for o in outcomes:
        print(f"  {o.outcome:11s} {o.file}{'  (' + o.error + ': ' + o.reason + ')' if o.error else ''}", flush=True)
    seconds["export+ingest"] = round(time.perf_counter() - clock, 1)
    distil(run, cfg, seed, load_trust_store(trust_file), ids["server"], architectures, seconds, started, resume=False)


def distil(run: Path, cfg: DemoConfig, seed: int, trust: Any, server_id: Any, architectures: list[str], seconds: dict[str, float],
           started: float, *, resume: bool) -> None:
    """The server's half: distil from the accepted bundles (``resume``: from the newest complete checkpoint); print and save metrics."""
    clock = time.perf_counter()
    sites = load_accepted(IngestFolders.under(run / "server").accepted, server_id, trust)
    test = to_dataset(load_medmnist(cfg.flag, "test", root=cfg.data_root))
    job = DistillJob(preset="cpu", execution=cfg.execution, seed=seed)
    result = run_distillation(sites, run / "server" / "global", job, test_set=test, progress=False, resume=resume)
    seconds["distill (this process)" if resume else "distill"] = round(time.perf_counter() - clock, 1)
    seconds["total (this process)" if resume else "total"] = round(time.perf_counter() - started, 1)
    metrics = dict(result.metrics)
    for model, m in metrics.items():
        print(f"  {model:28s} ACC {m['acc']:.3f} AUC {m['auc']:.3f} balanced ACC {m['balanced_acc']:.3f}")
    ensemble = next(m for k, m in metrics.items() if k.startswith("ensemble"))
    glob = next(m for k, m in metrics.items() if k.startswith("global"))
    print(f"global AUC - ensemble AUC = {glob['auc'] - ensemble['auc']:+.3f}; seconds {seconds}")
    (run / "mixed.json").write_text(json.dumps({"architectures": architectures, "seed": seed, "metrics": metrics, "seconds": seconds},
                                               indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

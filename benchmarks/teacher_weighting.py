"""Distil from one demo run's accepted bundles with each teacher weighting; print the ensemble and global metrics.

    python benchmarks/teacher_weighting.py RUN PRESET SCHEMES SEED [EPOCHS]
    python benchmarks/teacher_weighting.py demo-run smoke equal,agreement,label-counts 2 6

RUN is a `secure-oneshot demo --out RUN` folder (its demo keys are not passphrase-protected).  For
``label-counts`` the partition's exact class counts (RUN/partition.json) stand in for the sites' released
DP-noised counts, so that scheme's numbers are an upper bound.  Evaluated on the PneumoniaMNIST test split
($SECURE_ONESHOT_DATA).  One torch thread; CPU time is this process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.keys import load_identity, load_trust_store
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.study import DistillJob, load_accepted, run_distillation


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `secure-oneshot demo --out RUN` folder")
    parser.add_argument("preset", help="server preset (smoke, cpu, ...)")
    parser.add_argument("schemes", help="teacher weightings, comma-separated")
    parser.add_argument("seed", type=int)
    parser.add_argument("epochs", nargs="?", type=int, default=None, help="server epochs (default: the preset's)")
    args = parser.parse_args(argv)
    run, preset, schemes, seed, epochs = args.run, args.preset, args.schemes.split(","), args.seed, args.epochs
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the demo's unprotected key
    sites = load_accepted(run / "server" / "accepted", load_identity(run / "keys" / "server.key", None),
                          load_trust_store(run / "keys" / "trust.toml"))
    partition = json.loads((run / "partition.json").read_text())["sites"]
    test = to_dataset(load_medmnist("pneumoniamnist", "test", root=os.environ.get("SECURE_ONESHOT_DATA")))
    for scheme in schemes:
        if scheme == "label-counts":
            for site, part in zip(sites, partition):
                site.label_counts = torch.tensor(part["label_counts"], dtype=torch.float32)
        wall, cpu = time.perf_counter(), time.process_time()
        job = DistillJob(preset=preset, seed=seed, epochs=epochs, teacher_weighting=scheme, execution=Execution(device="cpu"))
        result = run_distillation(sites, run / f"weighting-{preset}-{scheme}", job, test_set=test)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"## {scheme}: {wall:.1f} s wall, {cpu:.1f} s CPU, weights {result.report['teacher_weighting']['weights']}")
        for row in ("ensemble (teacher)", "ensemble (equal weights)", "global (distilled)"):
            if row in result.metrics:
                m = result.metrics[row]
                print(f"| {row} | {m['acc']:.3f} | {m['auc']:.3f} | {m['balanced_acc']:.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])

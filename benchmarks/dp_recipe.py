"""Compare DP-SGD recipes for one site, side by side, on a public proxy or on an evaluation site.

    python benchmarks/dp_recipe.py --flag breastmnist --sites 1 --epsilon 8 --candidates cpu,dp
    python benchmarks/dp_recipe.py --flag pneumoniamnist --sites 5 --site 0 --alpha 0.5 --candidates cpu,dp --repeats 3

Each candidate is a training preset plus ``key=value`` overrides of TrainConfig fields, e.g.
``dp:batch_size=512,augment_views=8``.  Candidates run interleaved (round-robin over repeats) so that
load on the shared cores falls on all of them alike.  One JSON line per run: the site's validation-slice
and test metrics (ACC, AUC, balanced ACC), the epsilon of the DP record, wall and CPU seconds.

Tuning uses the *validation slice* of a public proxy (``--flag breastmnist --sites 1``: all of
BreastMNIST train+val as one site); the PneumoniaMNIST sites are only evaluated with what was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields, replace

import torch

from secure_oneshot.client.train import PRESETS, DataConfig, site_data, train_classifier
from secure_oneshot.data import Partition
from secure_oneshot.models.classifier import ClassifierConfig


def parse_candidate(text: str):  # type: ignore[no-untyped-def]
    name, _, overrides = text.partition(":")
    cfg = PRESETS[name]
    types = {f.name: f.type for f in fields(cfg)}
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, raw = item.partition("=")
        kind = types[key]
        if str(kind) == "bool":
            values[key] = {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
            continue
        values[key] = (float(raw) if "float" in str(kind) else int(raw) if "int" in str(kind) else raw) if raw != "None" else None
    return text, replace(cfg, **values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flag", default="breastmnist")
    ap.add_argument("--root", default=os.environ.get("SECURE_ONESHOT_DATA"))
    ap.add_argument("--sites", type=int, default=1)
    ap.add_argument("--site", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--scheme", choices=("iid", "dirichlet"), default="dirichlet", help="partition (with --sites > 1)")
    ap.add_argument("--partition-seed", type=int, default=0)
    ap.add_argument("--architecture", default="small-cnn")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--label-counts-epsilon", type=float, default=0.1)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--candidates", default="cpu,dp")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scheme = "iid" if args.sites == 1 else args.scheme
    data_cfg = DataConfig(flag=args.flag, root=args.root, site=args.site,
                          partition=Partition(n_sites=args.sites, scheme=scheme, alpha=args.alpha, seed=args.partition_seed))
    data = site_data(data_cfg, args.val_fraction, seed=0)
    candidates = [parse_candidate(c) for c in args.candidates.split(";")]
    for repeat in range(args.repeats):
        for name, cfg in candidates:
            cfg = replace(cfg, seed=repeat, dp_epsilon=args.epsilon if args.epsilon > 0 else None,
                          label_counts_epsilon=args.label_counts_epsilon if args.epsilon > 0 else None)
            model_cfg = ClassifierConfig(args.architecture, data.train.n_channels, data.train.n_classes)
            wall, cpu = time.perf_counter(), time.process_time()
            result = train_classifier(model_cfg, cfg, data)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            row = {"candidate": name, "repeat": repeat, "flag": args.flag, "site": args.site, "records": len(data.train),
                   "epsilon": round(result.dp.epsilon, 3) if result.dp else None,
                   **{f"{split}_{k}": round(v, 4) for split, m in result.metrics.items() for k, v in m.items()},
                   "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

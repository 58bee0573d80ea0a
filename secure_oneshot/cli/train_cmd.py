"""``secure-oneshot train`` and ``secure-oneshot partition``: the site's local job."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .._internal.threads import add_threads_option, apply_threads, prefer_passive_openmp

prefer_passive_openmp()   # before the imports below load torch: OpenMP reads it once, at load (see _internal/threads.py)

import numpy as np  # noqa: E402

from .._internal.atomic import atomic_write_bytes  # noqa: E402
from ..client.site_config import load_site_config, with_dp  # noqa: E402
from ..data import Partition, load_medmnist, partition_indices  # noqa: E402
from ..data.partition import label_counts  # noqa: E402
from .data_cmd import add_source_options, source_from_options  # noqa: E402
from .output import Result  # noqa: E402

__all__ = ["register"]


def _train(args: argparse.Namespace) -> Result:
    from ..client.site import run_site

    apply_threads(args.threads)
    cfg = load_site_config(args.config, root_override=args.data_root)
    if args.out:
        cfg = replace(cfg, out=Path(args.out))
    if args.dp_epsilon is not None:
        cfg = with_dp(cfg, args.dp_epsilon, args.dp_delta)
    if args.label_counts_epsilon is not None:
        cfg = replace(cfg, train=replace(cfg.train, label_counts_epsilon=args.label_counts_epsilon))
    if args.threshold_epsilon is not None:
        cfg = replace(cfg, train=replace(cfg.train, threshold_epsilon=args.threshold_epsilon or None))
    if args.loss is not None:
        cfg = replace(cfg, train=replace(cfg.train, loss=args.loss))
    if args.epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=args.epochs))
    if args.download:
        cfg = replace(cfg, data=replace(cfg.data, download=True))
    source = source_from_options(cfg.source, args, cfg.data.size)
    if source != cfg.source:
        cfg = replace(cfg, source=source, data=replace(cfg.data, size=source.size) if source else cfg.data)
    run = run_site(cfg, progress=not args.json)
    test = run.classifier.metrics.get("test", {})
    eps = {a: r["epsilon"] for a, r in run.record["dp"].items()}
    lines = [
        f"trained site {cfg.data.site} of {cfg.data.flag if cfg.source is None else 'its own ' + cfg.source.kind + ' images'} "
        f"({len(run.classifier.data.train)} records) -> {run.out}",
        f"  classifier  {cfg.model.architecture}, norm {run.classifier.model_config.norm}; "
        f"test ACC {test.get('acc', float('nan')):.3f} AUC {test.get('auc', float('nan')):.3f} "
        f"balanced ACC {test.get('balanced_acc', float('nan')):.3f}; loss {run.classifier.config.loss if run.classifier.config else 'ce'}",
        *(f"  {stem:11s} {n} tensors" for stem, n in run.files.items()),
        f"  DP          {', '.join(f'{a} epsilon {e}' for a, e in eps.items()) or 'none (not private)'}",
        f"  next: secure-oneshot export --model {run.out} --policy POLICY.toml ...",
    ]
    return Result({"out": str(run.out), "files": run.files, "metrics": run.classifier.metrics, "dp": run.record["dp"]}, lines)


def _partition(args: argparse.Namespace) -> Result:
    splits = [load_medmnist(args.flag, s, size=args.size, root=args.data_root, download=args.download) for s in ("train", "val")]
    labels = np.concatenate([s.labels for s in splits])
    config = Partition(args.sites, args.scheme, args.alpha, args.seed, args.min_size)
    parts = partition_indices(labels, config)
    counts = label_counts(labels, parts, splits[0].n_classes)
    data = {"flag": args.flag, "partition": config.__dict__, "sites": [{"site": i, "size": len(p), "label_counts": c, "indices": p.tolist()}
                                                                      for i, (p, c) in enumerate(zip(parts, counts))]}
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(data) + "\n").encode("ascii"))
    lines = [f"{args.flag} train+val ({len(labels)} records) -> {args.sites} sites, {args.scheme}" + (f" alpha {args.alpha}" if args.scheme == "dirichlet" else "")]
    lines += [f"  site {i}: {len(p):5d} records, labels {c}" for i, (p, c) in enumerate(zip(parts, counts))]
    return Result({k: v for k, v in data.items() if k != "sites"} | {"sites": [{k: v for k, v in s.items() if k != "indices"} for s in data["sites"]]}, lines)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    train = commands.add_parser("train", help="train a site's classifier (and optional generator) into a model directory", parents=[common])
    train.add_argument("--config", required=True, metavar="SITE.toml", help="site config (see README)")
    train.add_argument("--data-root", metavar="DIR", help="MedMNIST folder, or the image folder of a folder source "
                       "(overrides the config and $SECURE_ONESHOT_DATA)")
    train.add_argument("--out", metavar="DIR", help="model directory (overrides [output] dir)")
    train.add_argument("--dp-epsilon", type=float, help="train the classifier with DP-SGD to this epsilon (with the dp preset unless the config names one)")
    train.add_argument("--dp-delta", type=float, default=1e-5)
    train.add_argument("--label-counts-epsilon", type=float, metavar="EPS",
                       help="release a DP label histogram (artifact label_counts) at this epsilon; 0: none")
    train.add_argument("--threshold-epsilon", type=float, metavar="EPS",
                       help="DP, binary tasks: spend EPS of the budget measuring a balanced decision threshold; 0: none")
    train.add_argument("--loss", choices=("auto", "ce", "logit-adjusted"),
                       help="training loss (auto: logit-adjusted under DP when a label histogram is released)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--download", action="store_true", help="let medmnist download a missing file (needs internet access)")
    add_source_options(train)
    add_threads_option(train)
    train.set_defaults(handler=_train)

    part = commands.add_parser("partition", help="split train+val of a MedMNIST set among sites (IID or Dirichlet)", parents=[common])
    part.add_argument("--flag", default="pneumoniamnist")
    part.add_argument("--size", type=int, default=28)
    part.add_argument("--data-root", metavar="DIR")
    part.add_argument("--sites", type=int, default=5)
    part.add_argument("--scheme", choices=("iid", "dirichlet"), default="iid")
    part.add_argument("--alpha", type=float, default=0.6)
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--min-size", type=int, default=10)
    part.add_argument("--download", action="store_true", help="let medmnist download a missing file (needs internet access)")
    part.add_argument("--out", metavar="FILE.json", help="write every site's index list and label counts")
    part.set_defaults(handler=_partition)

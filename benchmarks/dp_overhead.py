"""DP-SGD overhead: one epoch of the same classifier without DP and with Opacus DP in each clipping mode.

Trains ``small-cnn`` (default) on site 0 of a 5-site PneumoniaMNIST split and
times training epochs only (best of N after a warm-up epoch; no evaluation, no
set-up), and prints seconds and the ratio
DP / non-DP for Opacus's per-sample-gradient modes ("hooks", the default;
"functorch") and ghost clipping ("ghost", no per-sample gradients stored).  The last line is the ratio of the fastest mode
that works.  Goal: <= 2x.

    python benchmarks/dp_overhead.py [--data-root DIR] [--architecture small-cnn] [--batch-size 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import torch

from torch import nn
from torch.utils.data import DataLoader

from secure_oneshot.client.train import PRESETS, DataConfig, _make_private, _optimizer, _train_epoch, site_data
from secure_oneshot.data import Partition, to_dataset
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier

# "ew" (expanded weights) is left out: Opacus warns it accumulates gradients incorrectly across steps.
MODES = ("hooks", "functorch", "ghost")


def epoch_seconds(model_cfg: ClassifierConfig, data, batch_size: int, mode: str | None, repeat: int) -> float:
    """Best of ``repeat`` timed training epochs after one warm-up epoch (evaluation and set-up excluded)."""
    cfg = replace(PRESETS["cpu"], epochs=repeat + 1, batch_size=batch_size, max_physical_batch_size=batch_size)
    if mode is not None:
        cfg = replace(cfg, dp_epsilon=8.0, grad_sample_mode=mode)
    torch.manual_seed(0)
    model = build_classifier(replace(model_cfg, norm="group" if mode else "batch"))
    loader = DataLoader(to_dataset(data.train), batch_size=batch_size, shuffle=True)
    optimizer, criterion = _optimizer(model, cfg), nn.CrossEntropyLoss()
    if mode is not None:
        _, model, optimizer, loader, criterion = _make_private(model, optimizer, loader, cfg)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        _train_epoch(model, loader, optimizer, cfg, criterion)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--architecture", default="small-cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = site_data(DataConfig(root=args.data_root, site=0, partition=Partition(5, "iid")))
    model_cfg = ClassifierConfig(args.architecture)
    base = epoch_seconds(model_cfg, data, args.batch_size, None, args.repeat)
    print(f"{args.architecture}, {len(data.train)} records, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"  no DP           {base:7.2f} s")
    ratios = {}
    for mode in MODES:
        try:
            seconds = epoch_seconds(model_cfg, data, args.batch_size, mode, args.repeat)
        except Exception as e:  # a mode Opacus does not support for this model
            print(f"  DP {mode:12s} failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        ratios[mode] = seconds / base
        print(f"  DP {mode:12s} {seconds:7.2f} s  ({ratios[mode]:.2f}x)")
    best = min(ratios, key=ratios.get)
    print(f"dp_overhead {args.architecture}: default hooks {ratios.get('hooks', float('nan')):.2f}x, fastest {best} {ratios[best]:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()

"""The teacher alone: test metrics of each teacher weighting on site models already trained (no distillation).

    python benchmarks/teacher_only.py SITES --public SPEC [--schemes equal,agreement,consensus]
        [--flag pneumoniamnist] [--data-root ../shared/data/medmnist]

SITES is a folder with ``sites/hospital-*/model`` (a demo run or a study's cache entry).  SPEC is what
``distill --proxy-images`` takes (``FLAG:SPLIT``, a folder, an ``.npz``); a demo run with
``--public-fraction`` wrote its set to ``RUN/server/public-images.npz``.  ``agreement`` runs the cpu
preset's 100-step synthetic probe (minutes on one thread); ``equal`` and ``consensus`` take seconds.
``consensus`` recalibrates the sites first where every site released label counts, as ``distill`` does.
Metrics are on the test split; nothing is selected on it.  One torch thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.data.proxy_images import load_proxy_images
from secure_oneshot.metrics import classification_metrics
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.site_models import load_model_dirs
from secure_oneshot.server.study import DistillJob, proxy_tensor, teacher_sites_for, teacher_weights
from secure_oneshot.server.weighting import pooled_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sites", type=Path)
    parser.add_argument("--public", required=True)
    parser.add_argument("--schemes", default="equal,consensus")
    parser.add_argument("--flag", default="pneumoniamnist")
    parser.add_argument("--data-root")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sites = load_model_dirs(sorted((args.sites / "sites").glob("hospital-*/model")))
    if not sites:
        raise SystemExit(f"no sites/hospital-*/model under {args.sites}")
    test = to_dataset(load_medmnist(args.flag, "test", root=args.data_root))
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = np.array([int(test[i][1]) for i in range(len(test))])
    synth, _ = DistillJob(preset="cpu").configs(sites)
    public = load_proxy_images(args.public, size=synth.image_size, channels=synth.channels, data_root=args.data_root)
    with torch.no_grad():
        logits = torch.stack([s.model.eval()(x).float() for s in sites])
    print(f"{len(sites)} sites, public set {public.source} ({len(public.images)} images), test {len(y)} images")
    for scheme in args.schemes.split(","):
        wall, cpu = time.perf_counter(), time.process_time()
        teacher, _ = teacher_sites_for(sites, scheme, synth, Execution(device="cpu"), proxy_tensor(public))
        weights = teacher_weights(teacher, scheme, synth, Execution(device="cpu"), public=proxy_tensor(public))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        scored = logits
        if teacher is not sites:   # recalibrated copies (consensus with every site's label counts)
            with torch.no_grad():
                scored = torch.stack([s.model.eval()(x).float() for s in teacher])
        m = classification_metrics(y, torch.softmax(pooled_logits(scored, weights), dim=-1).numpy())
        shown = "-" if weights is None else [round(float(w), 2) for w in weights[:, 0]]
        print(f"| {scheme} | {m['acc']:.3f} / {m['auc']:.3f} / {m['balanced_acc']:.3f} | weights (class 0) {shown} "
              f"| {wall:.1f} s wall, {cpu:.1f} s CPU |", flush=True)


if __name__ == "__main__":
    main()

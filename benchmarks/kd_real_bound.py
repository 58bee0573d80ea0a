"""Where distillation loses: the same student and KD, trained on real images instead of synthetic ones.

A diagnostic for researchers, not something the server can do (it has no images): the teacher is the
sites' weighted ensemble exactly as ``distill`` builds it (``--teacher-weighting``, default the cpu
preset's), the student is the architecture and normalisation ``distill`` would choose, the loss is
``kd_loss`` at the preset's temperature with the preset's optimiser settings, and the images are one
split of a MedMNIST set, labels unused.  If this student reaches the teacher's test metrics, what
``distill`` loses against the teacher is in the synthetic images, not in the student's capacity or the
KD recipe.

    python benchmarks/kd_real_bound.py RUN/sites/hospital-*/model --flag pneumoniamnist --split val \
        --data-root ../shared/data/medmnist [--steps 400] [--every 200]

Metrics are on the test split; nothing is selected on it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.metrics import evaluate_model
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.distill import kd_loss, student_norm
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.study import DistillJob, load_model_dirs, teacher_weights


def _rounded(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="site model directories")
    parser.add_argument("--flag", default="pneumoniamnist")
    parser.add_argument("--split", default="val", help="the split whose images (labels unused) replace the synthetic ones")
    parser.add_argument("--images-flag", default=None,
                        help="take the images from this MedMNIST set instead of --flag (another modality as the proxy)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--teacher-weighting", default=None)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=200, help="report test metrics every this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sites = load_model_dirs(args.models)
    job = DistillJob(preset=args.preset, teacher_weighting=args.teacher_weighting)
    synth, dcfg = job.configs(sites)
    weights = teacher_weights(sites, job.weighting, synth, Execution())
    teacher = Ensemble([s.model for s in sites], weights=weights, batched=False).eval()
    test = to_dataset(load_medmnist(args.flag, "test", root=args.data_root))
    images = to_dataset(load_medmnist(args.images_flag or args.flag, args.split, root=args.data_root)).tensors[0]
    print(f"teacher ({job.weighting})  {_rounded(evaluate_model(teacher, test))}")

    cfg = sites[0].config
    student = build_classifier(ClassifierConfig(cfg.architecture, cfg.in_channels, cfg.num_classes, student_norm([s.model for s in sites])))
    optimizer = torch.optim.SGD(student.parameters(), lr=dcfg.lr, momentum=dcfg.momentum, weight_decay=dcfg.weight_decay)
    started = time.process_time()
    for step in range(1, args.steps + 1):
        x = images[torch.randint(0, len(images), (args.batch_size,))]
        with torch.no_grad():
            targets = teacher(x)
        loss = kd_loss(student(x), targets, dcfg.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            student.eval()
            print(f"student, {step} KD steps on {len(images)} real {args.images_flag or args.flag} {args.split} images (T {dcfg.temperature:g}, "
                  f"{time.process_time() - started:.0f} CPU-s)  {_rounded(evaluate_model(student, test))}", flush=True)
            student.train()


if __name__ == "__main__":
    main()

"""Where a data-free student from DP hospitals loses accuracy: its ranking or its decision point.

    python benchmarks/dp_decision_point.py distill RUN OUT [--bn-weight W] [--teacher-weighting S] [--epochs N]
    python benchmarks/dp_decision_point.py analyse RUN MODEL...

RUN is a `secure-oneshot demo --dp-epsilon E --out RUN` folder; its site model folders
(RUN/sites/*/model, the files each hospital exported) are the teachers.  ``distill`` reruns the server's
data-free distillation (cpu preset, inversion, per-epoch checkpoints in OUT/checkpoint) with the inversion's
feature-statistics weight and the teacher weighting overridable; with the defaults it is the demo's own
distillation (same seed, same images, the same global model).  ``analyse`` takes global models
(``global.safetensors``) or checkpoint folders (each ``epoch-*`` in them) and prints, on the PneumoniaMNIST
test split ($SECURE_ONESHOT_DATA): ACC, the share called positive, the logit-margin quantiles, and the ACC
the same model would have at the best threshold (an oracle that reads the test labels) and at the
teacher's positive rate.  If the oracle ACC is high and the printed ACC low, the ranking survived and the
decision point did not.  Test labels are only read for this report, never to choose anything.
One torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server import study
from secure_oneshot.server.distill import student_norm
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.site_models import SiteModel, load_model_dirs


def _sites(run: Path) -> list[SiteModel]:
    folders = sorted((run / "sites").glob("*/model"))
    if not folders:
        sys.exit(f"no site model folders under {run}/sites/*/model (a demo run folder is expected)")
    return load_model_dirs(folders)


def _test_set() -> tuple[torch.Tensor, torch.Tensor]:
    data = to_dataset(load_medmnist("pneumoniamnist", "test"))
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
    return images, labels


def distill(args: argparse.Namespace) -> None:
    synth_options, distill_options = study.PRESETS["cpu"]
    if args.bn_weight is not None:   # the preset table is the only place the inversion's prior weight is set
        study.PRESETS["cpu"] = ({**synth_options, "bn_weight": args.bn_weight}, distill_options)
    sites = _sites(args.run)
    job = study.DistillJob(preset="cpu", epochs=args.epochs, teacher_weighting=args.teacher_weighting, seed=args.seed)
    started, cpu = time.perf_counter(), time.process_time()
    result = study.run_distillation(sites, args.out, job, test_set=to_dataset(load_medmnist("pneumoniamnist", "test")))
    print(json.dumps({"bn_weight": args.bn_weight, "teacher_weighting": args.teacher_weighting, "epochs": args.epochs,
                      "history": [{k: round(v, 3) for k, v in h.items() if k in ("epoch", "loss", "acc", "auc", "balanced_acc")}
                                  for h in result.history],
                      "teacher": result.metrics["ensemble (teacher)"], "global": result.metrics["global (distilled)"],
                      "wall_s": round(time.perf_counter() - started), "cpu_s": round(time.process_time() - cpu)}))


def _students(path: Path) -> list[tuple[str, dict[str, torch.Tensor], torch.Tensor | None]]:
    """(name, student weights, teacher weights) for a global model file or every epoch of a checkpoint folder."""
    if path.is_file():
        report = path.parent / "report.json"
        weights = json.loads(report.read_text())["teacher_weighting"]["weights"] if report.exists() else None
        return [(str(path), load_file(path), None if weights is None else torch.tensor(weights))]
    out = []
    for epoch in sorted(path.glob("epoch-*")):
        state = load_file(epoch / "state.safetensors")
        out.append((f"{path}/{epoch.name}", {k[len("student/"):]: v for k, v in state.items() if k.startswith("student/")},
                    state.get("teacher_weights")))
    return out


def analyse(args: argparse.Namespace) -> None:
    sites = _sites(args.run)
    images, labels = _test_set()
    config = sites[0].config
    student_config = ClassifierConfig(config.architecture, config.in_channels, config.num_classes,
                                      student_norm([s.model for s in sites]))   # as run_distillation builds it
    teacher_rates: dict[bytes, float] = {}   # a run's checkpoints share one teacher: its pass runs once
    print(f"test split: {len(labels)} images, positive rate {labels.float().mean():.3f}")
    for path in args.models:
        for name, weights, teacher_weights in _students(path):
            key = b"" if teacher_weights is None else teacher_weights.numpy().tobytes()
            with torch.no_grad():
                if key not in teacher_rates:
                    teacher = Ensemble([s.model for s in sites], weights=teacher_weights).eval()(images)
                    teacher_rates[key] = (teacher.argmax(1) == 1).float().mean().item()
                student = build_classifier(student_config)
                student.load_state_dict(weights)
                logits = student.eval()(images)
            teacher_rate = teacher_rates[key]
            margin = logits[:, 1] - logits[:, 0]
            acc = ((margin > 0).long() == labels).float().mean().item()
            oracle = max(((margin > t).long() == labels).float().mean().item() for t in margin)
            at_rate = ((margin > torch.quantile(margin, 1 - teacher_rate)).long() == labels).float().mean().item()
            quantiles = np.round(np.quantile(margin.numpy(), [0.05, 0.5, 0.95]), 2).tolist()
            print(f"{name}: ACC {acc:.3f}, called positive {(margin > 0).float().mean():.3f} (teacher {teacher_rate:.3f}), "
                  f"margin 5/50/95% {quantiles}; ACC at the best threshold {oracle:.3f}, at the teacher's rate {at_rate:.3f}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("distill", help="rerun the data-free distillation from RUN's site models")
    run.add_argument("run", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("--bn-weight", type=float, default=None, help="the inversion's prior weight (cpu preset: 0.1)")
    run.add_argument("--teacher-weighting", default="agreement", help="agreement (the demo's), label-counts, equal")
    run.add_argument("--epochs", type=int, default=6, help="server epochs (the DP demo's: 6)")
    run.add_argument("--seed", type=int, default=0)
    check = commands.add_parser("analyse", help="ranking against decision point of global models or checkpoints")
    check.add_argument("run", type=Path)
    check.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    (distill if args.command == "distill" else analyse)(args)


if __name__ == "__main__":
    main(sys.argv[1:])

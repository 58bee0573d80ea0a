"""Where a data-free global model's decision point could come from: its class offsets fitted on a fresh synthetic batch.

The data-free route (model inversion, no public images, no released label counts) has no data to place the global
model's decision point on.  One candidate is the synthetic data itself: the inversion makes a batch *for* balanced
target classes, so the offsets of maximum likelihood of those targets (``class_prior.fit_class_offsets`` with
one-hot targets; at the fit the mean class probabilities equal the targets' balanced shares) move the decision
point to where the model splits the teacher's own synthetic classes evenly.  This script measures that, after the
fact, on the runs of a finished study (``secure-oneshot experiment``): for every cell it loads the hospitals' cached
models, the cell's teacher weights and the global model as trained (the last epoch's checkpoint), inverts one fresh batch by that teacher (seed 10,000 + the
cell's seed, the run's inversion settings), fits the offsets for the global model and, for comparison, for the
teacher itself, and prints ACC / balanced ACC on the test split before and after.  AUC does not change (one offset
per class moves every margin by the same amount).

    python benchmarks/decision_point.py STUDY_DIR [STUDY_DIR ...] --data-root ../shared/data/medmnist [--batch N] [--threads 1]

Only single-label cells with BatchNorm sites are measured (the inversion needs their statistics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from secure_oneshot.data.medmnist_data import load_medmnist, to_dataset
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.class_prior import fit_class_offsets
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.site_models import load_model_dirs
from secure_oneshot.server.synthesis import InversionConfig, synthesize_batch


def acc_and_balanced(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    predicted = logits.argmax(dim=1)
    per_class = [(predicted[labels == k] == k).double().mean().item() for k in labels.unique().tolist()]
    return (predicted == labels).double().mean().item(), statistics.fmean(per_class)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + 512]).float() for i in range(0, len(images), 512)])


def caches_by_seed(study: Path) -> dict[tuple[str, int], Path]:
    out = {}
    for cache in (study / "cache").iterdir():
        partition = cache / "partition.json"
        if partition.is_file():
            record = json.loads(partition.read_text())
            out[(record["flag"], record["partition"]["seed"])] = cache
    return out


def measure_cell(cell: Path, caches: dict[tuple[str, int], Path], data_root: str, batch: int | None,
                 tests: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object] | None:
    report_path = cell / "server" / "global" / "report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    result = json.loads((cell / "result.json").read_text())
    flag, seed = result["flag"], int(result["seed"])
    sites = load_model_dirs(sorted((caches[(flag, seed)] / "sites").glob("*/model")))
    models = [s.model for s in sites]
    weights = report["teacher_weighting"]["weights"]
    teacher = Ensemble(models, weights=None if weights is None else torch.tensor(weights))
    student = build_classifier(ClassifierConfig(**report["student"]))
    # The student as trained: the last epoch's checkpoint (global.safetensors may hold offsets fitted after training).
    last = sorted((cell / "server" / "global" / "checkpoint").glob("epoch-*/state.safetensors"))[-1]
    student.load_state_dict({k.removeprefix("student/"): v for k, v in load_file(str(last)).items() if k.startswith("student/")})
    student.eval()
    inversion = {**report["inversion"], "seed": 10_000 + seed, "snapshot_every": report["inversion"]["steps"]}
    if batch:
        inversion["batch_size"] = batch
    cfg = InversionConfig(**inversion)
    started = time.process_time()
    images, targets = synthesize_batch(models, teacher, cfg, execution=Execution("cpu", precision="fp32"))
    seconds = time.process_time() - started
    if flag not in tests:
        split = to_dataset(load_medmnist(flag, "test", root=data_root))
        tests[flag] = (torch.stack([split[i][0] for i in range(len(split))]),
                       torch.tensor([int(split[i][1]) for i in range(len(split))]))
    test_images, test_labels = tests[flag]
    row: dict[str, object] = {"cell": cell.name, "synthesis_cpu_s": round(seconds, 1)}
    onehot = torch.nn.functional.one_hot(targets.long(), cfg.num_classes).double()
    for name, model in (("global", student), ("teacher", teacher)):
        offsets = fit_class_offsets(logits_of(model, images.detach()), onehot).float()
        test_logits = logits_of(model, test_images)
        row[name] = {"before": acc_and_balanced(test_logits, test_labels),
                     "after": acc_and_balanced(test_logits + offsets, test_labels), "offsets": offsets.tolist()}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path, help="finished study folders (secure-oneshot experiment --out)")
    parser.add_argument("--data-root", required=True, help="MedMNIST folder")
    parser.add_argument("--batch", type=int, default=None, help="synthetic images (default: the run's inversion batch)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for study in args.studies:
        caches = caches_by_seed(study)
        for cell in sorted((study / "cells").iterdir()):
            row = measure_cell(cell, caches, args.data_root, args.batch, tests)
            if row is None:
                continue
            rows.append(row)
            shown = "  ".join(f"{name} {row[name]['before'][0]:.3f}/{row[name]['before'][1]:.3f} -> "   # type: ignore[index]
                              f"{row[name]['after'][0]:.3f}/{row[name]['after'][1]:.3f} (offset {row[name]['offsets'][1]:+.2f})"  # type: ignore[index]
                              for name in ("global", "teacher"))
            print(f"{study.name}/{cell.name}: {shown}  [synthesis {row['synthesis_cpu_s']} CPU-s]", flush=True)
    if not rows:
        print("no finished cells", file=sys.stderr)
        return 1
    for name in ("global", "teacher"):
        for when in ("before", "after"):
            accs = [r[name][when][0] for r in rows]   # type: ignore[index]
            balanced = [r[name][when][1] for r in rows]   # type: ignore[index]
            print(f"{name:8s} {when:6s} ACC {statistics.fmean(accs):.3f} +- {statistics.stdev(accs) if len(accs) > 1 else 0:.3f} "
                  f"(min {min(accs):.3f})  balanced ACC {statistics.fmean(balanced):.3f}  over {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

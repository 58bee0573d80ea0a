"""Four ways to set a distilled global model's decision point on the server's public images, compared on a study.

    python benchmarks/prior_matching.py STUDY [--cells cells] [--flag pneumoniamnist] [--data-root ../shared/data/medmnist]

STUDY is an ``experiment`` folder of proxy cells (``--cells`` names the folder of cells when they were moved
aside).  A cell distilled with prior matching has its recorded offsets taken off again (they were folded into
the last layer's bias, so the logits move by exactly them), which gives back the model as trained.  For every
cell: the teacher (its report's weights, over the cached site models), the global model as trained, and the
global model with per-class offsets fitted on the cell's public images in four ways:

* ``mean-prob``: offsets making the student's mean class probabilities equal the teacher's (maximum likelihood
  against the teacher's soft predictions; ``server.class_prior``'s target when a site released no label counts);
* ``hard-rate``: binary only: the threshold at which the student calls class 1 as often as the teacher does;
* ``hard-fit``: maximum likelihood against the teacher's hard decisions (one-hot);
* ``label-counts``: the student's shares of decisions equal to the class shares of the sites' released label
  counts, pooled (``server.class_prior``'s target when every site released them).

Test-split metrics (ACC / AUC / balanced ACC); nothing is chosen on them.  One torch thread.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from secure_oneshot.data import load_medmnist, to_dataset
from secure_oneshot.data.proxy_images import load_proxy_images
from secure_oneshot.metrics import classification_metrics
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.class_prior import fit_class_offsets, fit_decision_shares
from secure_oneshot.server.site_models import load_model_dirs
from secure_oneshot.server.study import proxy_tensor
from secure_oneshot.server.weighting import pooled_logits


def hard_rate_offsets(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Binary: the offset on class 1 at which the student's rate of class-1 decisions equals the teacher's."""
    rate = (teacher.argmax(1) == 1).double().mean().item()
    margins = (student[:, 1] - student[:, 0]).double().sort().values
    k = int(round((1 - rate) * len(margins)))
    if not 0 < k < len(margins):
        return torch.zeros(2, dtype=torch.float64)
    return torch.tensor([0.0, -float(margins[k - 1] + margins[k]) / 2], dtype=torch.float64)


def distilled_from(row: dict, cache: Path) -> bool:
    """Whether a study row's run distilled the cached site set ``cache``: same flag, alpha and seed, and the same
    composed epsilon of what the sites released (a study caches one site set per DP epsilon of each seed, and one
    without DP; the cache key is a hash and does not say which)."""
    from secure_oneshot.research.experiment import _epsilons

    partition = json.loads((cache / "partition.json").read_text())
    if (partition["flag"], partition["partition"]["alpha"], partition["partition"]["seed"]) != (row["flag"], row["alpha"], row["seed"]):
        return False
    models = sorted((cache / "sites").glob("hospital-*/model"))
    return _epsilons(models, ())["epsilon_composed_max"] == row["epsilon_composed_max"]


def cache_of(cell: Path, caches: list[Path]) -> Path:
    """The cached site set a cell distilled from (:func:`distilled_from`)."""
    row = json.loads((cell / "result.json").read_text())
    for cache in caches:
        if distilled_from(row, cache):
            return cache
    raise SystemExit(f"{cell.name}: no cached site set in the study's cache/ matches its row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--cells", default="cells")
    parser.add_argument("--flag", default="pneumoniamnist")
    parser.add_argument("--data-root")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = to_dataset(load_medmnist(args.flag, "test", root=args.data_root))
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = np.array([int(test[i][1]) for i in range(len(test))])
    caches = [d for d in (args.study / "cache").iterdir() if (d / "done.json").exists()]

    def shown(logits: torch.Tensor) -> str:
        m = classification_metrics(y, torch.softmax(logits.double(), dim=1).numpy())
        return f"{m['acc']:.3f} / {m['auc']:.3f} / {m['balanced_acc']:.3f}"

    print("| cell | teacher | global as trained | mean-prob | hard-rate | hard-fit | label-counts |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cell in sorted((args.study / args.cells).iterdir()):
        report = json.loads((cell / "server" / "global" / "report.json").read_text())
        matched = report.get("prior_matching") or {}
        folded = torch.tensor(matched["offsets"], dtype=torch.float64) if matched.get("applied") else None
        cache = cache_of(cell, caches)
        s = report["student"]
        student = build_classifier(ClassifierConfig(s["architecture"], s["in_channels"], s["num_classes"], s["norm"]))
        student.load_state_dict(load_file(cell / "server" / "global" / "global.safetensors"))
        sites = load_model_dirs(sorted((cache / "sites").glob("hospital-*/model")))
        weights = report["teacher_weighting"]["weights"]
        weights = None if weights is None else torch.tensor(weights)
        public = proxy_tensor(load_proxy_images(str(cache / "server" / "public-images.npz"), size=28, channels=s["in_channels"]))
        with torch.no_grad():
            teacher_test = pooled_logits(torch.stack([m.model.eval()(x).float() for m in sites]), weights)
            teacher_public = pooled_logits(torch.stack([m.model.eval()(public).float() for m in sites]), weights)
            student_test, student_public = student.eval()(x).double(), student(public).double()
        if folded is not None:   # the model as trained
            student_test, student_public = student_test - folded, student_public - folded
        mean_prob = fit_class_offsets(student_public, torch.softmax(teacher_public, dim=1))
        hard_fit = fit_class_offsets(student_public, torch.nn.functional.one_hot(teacher_public.argmax(1), s["num_classes"]).double())
        hard_rate = hard_rate_offsets(student_public, teacher_public) if s["num_classes"] == 2 else None
        counts = [m.label_counts for m in sites]
        shares = None if any(c is None for c in counts) else \
            fit_decision_shares(student_public, torch.stack([c.double().clamp(min=0) for c in counts]).sum(dim=0))
        print(f"| {cell.name} | {shown(teacher_test)} | {shown(student_test)} | {shown(student_test + mean_prob)} | "
              f"{'-' if hard_rate is None else shown(student_test + hard_rate)} | {shown(student_test + hard_fit)} | "
              f"{'-' if shares is None else shown(student_test + shares)} |", flush=True)


if __name__ == "__main__":
    main()

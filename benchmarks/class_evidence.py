"""The class-evidence check on a study's cached DP site sets, beside the study's measured AUCs, and at other
label-count budgets (simulated).

For every cached site set whose hospitals all released a label histogram (``STUDY/cache/<key>``), prints one
Markdown row: the largest smaller side of any hospital's released counts (records and noise standard deviations),
the same from the partition's exact counts, what :func:`~secure_oneshot.server.class_evidence.class_evidence`
decides, and the global and weighted-teacher test AUC of the study run that distilled these sites (from
``--cells``, default ``STUDY/cells``).  Binary tasks only.

``--budgets 0.1,0.5`` adds a second table: for each cached set, the share of ``--draws`` fresh Gaussian noise draws
on the hospitals' exact training counts (their ``record.json``) at each label-count epsilon's sigma that the
check refuses.  Nothing is trained; the classifiers would change a little with another budget split, the check
does not depend on them.

    python benchmarks/class_evidence.py STUDY [--cells DIR] [--budgets 0.1,0.2,0.5,1.0] [--draws 20000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secure_oneshot.client.label_counts import calibrate_sigma  # noqa: E402
from secure_oneshot.server.class_evidence import class_evidence, shown_smaller_side, shows_both_sides  # noqa: E402
from secure_oneshot.server.site_models import load_model_dirs  # noqa: E402

from prior_matching import distilled_from  # noqa: E402  (this folder)


def cached_sets(study: Path) -> list[tuple[Path, dict]]:
    """(folder, partition) of every finished cached site set whose hospitals all released label counts."""
    found = []
    for folder in sorted((study / "cache").iterdir()):
        if (folder / "done.json").is_file() and all((m / "label_counts.safetensors").is_file()
                                                     for m in (folder / "sites").glob("hospital-*/model")):
            found.append((folder, json.loads((folder / "partition.json").read_text())))
    return found


def study_row(folder: Path, cells: Path) -> dict | None:
    """The finished study run that distilled this site set (prior_matching.distilled_from), if any."""
    for result in sorted(cells.glob("*/result.json")):
        row = json.loads(result.read_text())
        if distilled_from(row, folder):
            return row
    return None


def evidence_rows(study: Path, cells: Path) -> list[str]:
    rows = []
    for folder, part in cached_sets(study):
        p = part["partition"]
        sites = load_model_dirs(sorted((folder / "sites").glob("hospital-*/model")))
        if sites[0].config.num_classes != 2:
            continue
        smaller, z = max(shown_smaller_side(s) for s in sites)
        true = max(min(s["label_counts"]) for s in part["sites"])
        row = study_row(folder, cells) or {}
        epsilon = float(row.get("epsilon", "nan"))   # no finished run: unknown, listed last
        shown_auc = [f"{row[k]:.3f}" if k in row else "-" for k in ("global_auc", "ensemble_auc")]
        decision = "refused" if class_evidence(sites).unsupported else "distils"
        rows.append((part["flag"], p["alpha"], math.inf if math.isnan(epsilon) else -epsilon, p["seed"],
                     f"| {part['flag']} | {p['alpha']} | {epsilon:g} | {p['seed']} | {smaller:.0f} / {z:.1f} | {true} | "
                     f"{decision} | {' | '.join(shown_auc)} |"))
    header = ["| flag | alpha | epsilon | seed | largest smaller side (records / sigma) | true | check | global AUC | teacher AUC |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    return header + [r[-1] for r in sorted(rows)]


def budget_rows(study: Path, budgets: list[float], draws: int, seed: int = 0) -> list[str]:
    sigmas = {e: calibrate_sigma(e, 1e-5) for e in budgets}
    rng = np.random.default_rng(seed)
    exact: dict[tuple, np.ndarray] = {}
    for folder, part in cached_sets(study):   # one row per partition: every epsilon of a seed shares its counts
        p = part["partition"]
        records = [json.loads((folder / f"sites/hospital-{i + 1}/model/record.json").read_text()) for i in range(len(part["sites"]))]
        exact.setdefault((part["flag"], p["alpha"], p["seed"]),
                         np.array([r["training"]["data"]["label_counts"] for r in records], dtype=float))
    lines = ["| set | exact training counts (per hospital) | " + " | ".join(f"refused at {e:g} (sigma {sigmas[e]:.1f})" for e in budgets) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in budgets) + " |"]
    for (flag, alpha, seed_), counts in sorted(exact.items()):
        shares = []
        for e in budgets:
            noisy = torch.from_numpy(counts[None] + rng.normal(0.0, sigmas[e], size=(draws, *counts.shape)))
            passes = shows_both_sides(noisy, sigmas[e]).any(dim=1).all(dim=-1)   # every class shown by some hospital
            shares.append(f"{1 - passes.double().mean().item():.3f}")
        lines.append(f"| {flag} a{alpha} s{seed_} | {counts.astype(int).tolist()} | " + " | ".join(shares) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study folder with its cache/")
    parser.add_argument("--cells", type=Path, help="finished runs' cells/ (default STUDY/cells)")
    parser.add_argument("--budgets", default="", help="label-count epsilons to simulate, comma-separated")
    parser.add_argument("--draws", type=int, default=20000)
    args = parser.parse_args()
    print("\n".join(evidence_rows(args.study, args.cells or args.study / "cells")))
    if args.budgets:
        print()
        print("\n".join(budget_rows(args.study, [float(e) for e in args.budgets.split(",")], args.draws)))


if __name__ == "__main__":
    main()

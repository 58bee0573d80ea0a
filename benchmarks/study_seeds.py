"""Per-seed tables of a study's finished runs, one per cell, for benchmarks/RESULTS.md.

    python benchmarks/study_seeds.py STUDY_FOLDER     # reads STUDY_FOLDER/cells/*/result.json

``report.md`` (written by ``secure-oneshot experiment``) has the mean +- std per cell; this prints every seed's
row under it: the global model, the weighted teacher, the equal-weight ensemble, one-shot FedAvg's AUC and the
centralised reference (ACC / AUC / balanced ACC), the composed epsilon of the largest site and the run's seconds.
Means and (population) standard deviations as in ``report.md``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("acc", "auc", "balanced_acc")


def _number(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.3f}"


def _trio(row: dict[str, Any], model: str) -> str:
    return " / ".join(_number(row, f"{model}_{m}") for m in METRICS)


def _mean_std(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    return "-" if not values else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _means(rows: list[dict[str, Any]], model: str) -> str:
    return " / ".join(_mean_std(rows, f"{model}_{m}") for m in METRICS)


def _order(key: tuple[str, Any, Any]) -> tuple[str, float, float]:
    flag, alpha, epsilon = key
    return flag, -float(alpha), float("inf") if epsilon == "inf" else -float(epsilon)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    args = parser.parse_args()
    cells: dict[tuple[str, Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(args.study.glob("cells/*/result.json")):
        row = json.loads(path.read_text())
        cells[(row["flag"], row["alpha"], row["epsilon"])].append(row)
    if not cells:
        raise SystemExit(f"no finished runs under {args.study}/cells")
    for key in sorted(cells, key=_order):
        rows = sorted(cells[key], key=lambda r: r["seed"])
        flag, alpha, epsilon = key
        print(f"\n{flag}, Dirichlet {alpha}, epsilon {epsilon}: {len(rows)} seed(s)\n")
        print("| seed | **global** | teacher (weighted) | equal-weight ensemble | FedAvg AUC | centralised | composed epsilon | s |")
        print("| ---: | --- | --- | --- | ---: | --- | ---: | ---: |")
        for r in rows:
            composed = r.get("epsilon_composed_max")
            print(f"| {r['seed']} | **{_trio(r, 'global')}** | {_trio(r, 'ensemble')} | {_trio(r, 'ensemble_equal')} | "
                  f"{_number(r, 'fedavg_auc')} | {_trio(r, 'centralised')} | {'-' if composed is None else f'{composed:.2f}'} | "
                  f"{r['seconds']:.0f} |")
        print(f"| mean ± std | **{_means(rows, 'global')}** | {_means(rows, 'ensemble')} | {_means(rows, 'ensemble_equal')} | "
              f"{_mean_std(rows, 'fedavg_auc')} | {_means(rows, 'centralised')} | | |")


if __name__ == "__main__":
    main()

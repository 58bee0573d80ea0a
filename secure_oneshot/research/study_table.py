"""The rows of a study and their summary: the fields of one (cell, seed) run, mean +- std over seeds per cell, and
the Markdown table of ``report.md``.  :mod:`~secure_oneshot.research.experiment` runs the cells and
:mod:`~secure_oneshot.research.plots` draws these summaries."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["MODELS", "METRICS", "GROUP_FIELDS", "ROW_FIELDS", "METRIC_FIELDS", "Group", "alpha_label", "summarise",
           "markdown_summary"]

MODELS = {"sites": "sites (mean)", "ensemble": "ensemble (teacher)", "fedavg": "fedavg (one-shot)", "global": "global (distilled)",
          "ensemble_equal": "ensemble (equal weights)"}  # the published teacher beside a weighted one (the same when equal)
"""What every run's distillation report holds (a model it could not build, e.g. FedAvg of mixed architectures: NaN)."""
REFERENCES = ("centralised",)  # [study] centralised: one model on all records pooled, same epsilon; absent when off
METRICS = ("acc", "auc", "balanced_acc")
GROUP_FIELDS = ("flag", "alpha", "epsilon", "generator_epsilon", "withheld", "method")  # a cell; + seed = a run
ROW_FIELDS = [*GROUP_FIELDS, "seed",
              *[f"{m}_{k}" for m in (*MODELS, *REFERENCES) for k in METRICS],
              "epsilon_classifier_max", "epsilon_generator_max", "epsilon_composed_max", "bytes_transferred", "seconds",
              "mia_sites_auc_max", "mia_sites_epsilon_max", "mia_global_auc", "lira_sites_auc_max",
              "mia_generators_auc_max", "lira_generators_auc_max", "generator_near_copies_max",
              "synthetic_near_copies", "synthetic_median_ratio",
              "refused", "unsupported_classes"]  # distillation refused (1) by the class-evidence check; classes no site shows


def alpha_label(alpha: Any, prefix: str = "") -> str:
    """A label split as rows and names write it: "iid" (math.inf in a Cell) or the Dirichlet alpha, e.g. "a0.5"."""
    return "iid" if alpha == "iid" or (isinstance(alpha, float) and math.isinf(alpha)) else f"{prefix}{float(alpha):g}"


def _stats(values: list[float]) -> tuple[float, float, int]:
    return (float(np.mean(values)), float(np.std(values)), len(values)) if values else (math.nan, math.nan, 0)


class Group(NamedTuple):
    """A cell: every grid dimension but the seed."""

    flag: str
    alpha: Any                  # "iid" or a Dirichlet alpha
    epsilon: Any                # "inf" or a number
    generator_epsilon: Any      # "none" (no generator), "inf" or a number
    withheld: str               # "none" or artifacts joined by "+"
    method: str


METRIC_FIELDS = ROW_FIELDS[len(GROUP_FIELDS) + 1:]


def summarise(rows: list[dict[str, Any]]) -> dict[Group, dict[str, tuple[float, float, int]]]:
    """Cell -> column -> (mean, std, n) over seeds (missing values left out)."""
    groups: dict[Group, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(Group(*(row.get(f, "none") for f in GROUP_FIELDS)), []).append(row)
    return {key: {f: _stats([float(r[f]) for r in grp if r.get(f) is not None]) for f in METRIC_FIELDS}
            for key, grp in groups.items()}


def _mean_std(stats: tuple[float, float, int]) -> str:
    return "-" if not stats[2] else f"{stats[0]:.3f} +- {stats[1]:.3f}"


def markdown_summary(study: Any, rows: list[dict[str, Any]]) -> str:
    """``report.md``: one row per cell (mean +- std over its seeds) of a study (its ``name`` and ``privacy_audit``)."""
    utility = {"sites AUC": "sites_auc", "ensemble AUC": "ensemble_auc", "ensemble ACC": "ensemble_acc",
               "equal-weight ensemble ACC": "ensemble_equal_acc", "FedAvg AUC": "fedavg_auc", "global AUC": "global_auc",
               "global ACC": "global_acc", "global bal. ACC": "global_balanced_acc", "centralised ACC": "centralised_acc"}
    privacy = {"MIA AUC (worst site)": "mia_sites_auc_max", "MIA AUC (global)": "mia_global_auc",
               "MIA AUC (worst generator)": "mia_generators_auc_max"}
    refusals = any(r.get("refused") for r in rows)   # the column only where the class-evidence check refused a run
    header = ["flag", "alpha", "epsilon", "generator epsilon", "withheld", "method", "seeds", *(["refused"] if refusals else []),
              *utility, "composed epsilon", *privacy]
    lines = [f"# Study {study.name}", "", f"{len(rows)} finished (cell, seed) runs; mean +- std over seeds. "
             "The global model is the last epoch's; the test split is only evaluated. \"withheld\": artifacts the sites "
             "left out of their bundles." + (" \"refused\": runs whose distillation was refused because no hospital's "
             "released label counts show records of both sides of a class (no model, so not among \"seeds\")."
             if refusals else "") + (" Each run's privacy audit of every site, as a page for a data-protection impact assessment: "
             "`cells/<run>/audit/<site>.md`." if study.privacy_audit else ""), "", "| " + " | ".join(header) + " |",
             "|" + " --- |" * len(header)]
    for key, s in summarise(rows).items():
        composed = s["epsilon_composed_max"]
        refused = s["refused"]
        values = [key.flag, alpha_label(key.alpha), key.epsilon, key.generator_epsilon, key.withheld, key.method, s["global_auc"][2],
                  *([round(refused[0] * refused[2]) if refused[2] else 0] if refusals else []),
                  *(_mean_std(s[f]) for f in utility.values()),
                  "-" if math.isnan(composed[0]) else f"{composed[0]:.2f}", *(_mean_std(s[f]) for f in privacy.values())]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"

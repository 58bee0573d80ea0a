"""Plots of a study's results (matplotlib, PNG + SVG, readable in black and white).

* :func:`privacy_utility`: epsilon (log axis; "no DP" drawn at the right end)
  against the global model's AUC and ACC, mean with error bars (std over
  seeds), the ensemble and one-shot FedAvg as reference lines;
* :func:`utility_vs_alpha`: the same models against the Dirichlet alpha
  (log axis; smaller = more skewed label splits);
* :func:`method_comparison`: the global model per synthesis method and per
  variant of what the sites release (``[policy] withhold``).

Each model has its own marker and line style, so nothing depends on colour.
Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .study_table import Group, alpha_label, summarise  # noqa: E402

__all__ = ["privacy_utility", "utility_vs_alpha", "method_comparison", "label_distribution", "label_distribution_name", "study_plots",
           "save_figure"]

STYLES = {"global": ("o", "-", "global (distilled)"), "ensemble": ("s", "--", "ensemble (teacher)"),
          "fedavg": ("^", ":", "one-shot FedAvg"), "sites": ("v", "-.", "sites (mean)"),
          "centralised": ("D", (0, (5, 1)), "centralised (pooled records, same epsilon)")}


def save_figure(fig: Any, stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.svg``, each via a temp file and rename."""
    paths = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".png", ".svg"):
        target = stem.parent / (stem.name + suffix)  # not with_suffix: "a0.5" in a stem is not a suffix
        tmp = target.with_name(f".{target.name}.tmp")
        fig.savefig(tmp, format=suffix[1:], dpi=150, bbox_inches="tight")
        os.replace(tmp, target)
        paths.append(target)
    plt.close(fig)
    return paths


def _series(rows: list[dict[str, Any]], x_of: Any, keep: Any) -> dict[str, dict[str, list[float]]]:
    """model -> {"x", "mean", "std"} per metric, over the cells that ``keep`` accepts."""
    summary = {k: v for k, v in summarise(rows).items() if keep(k)}
    points = sorted(((x_of(key), stats) for key, stats in summary.items()), key=lambda point: point[0])
    out: dict[str, dict[str, list[float]]] = {}
    for model in STYLES:
        for metric in ("auc", "acc"):
            col = f"{model}_{metric}"
            known = [(x, s[col]) for x, s in points if col in s and s[col][2] > 0]  # a model no run reported is left out
            out[f"{model}_{metric}"] = {"x": [x for x, _ in known], "mean": [m[0] for _, m in known], "std": [m[1] for _, m in known]}
    return out


def _draw(ax: Any, series: dict[str, dict[str, list[float]]], metric: str, models: tuple[str, ...]) -> None:
    for model in models:
        marker, style, label = STYLES[model]
        data = series[f"{model}_{metric}"]
        if not data["x"]:
            continue
        ax.errorbar(data["x"], data["mean"], yerr=data["std"], marker=marker, linestyle=style, color="black",
                    capsize=3, markerfacecolor="white" if model != "global" else "black", label=label)
    ax.set_ylabel(f"test {metric.upper()} (mean +- std over seeds)")
    ax.grid(True, linestyle=":", linewidth=0.5)


def _legend_below(fig: Any, ax: Any) -> None:
    """One legend under both panels, where it hides no point."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)), fontsize=8, frameon=False)


def _same_but(field: str, cell: Group) -> Any:
    """Accepts the cells that differ from ``cell`` in ``field`` at most."""
    return lambda key: key._replace(**{field: None}) == cell._replace(**{field: None})


def _variant(cell: Group) -> str:
    """The cell's release and generator settings, for titles ("" for a plain classifier study)."""
    parts = [f"generator epsilon {cell.generator_epsilon}"] if cell.generator_epsilon != "none" else []
    parts += [f"withheld: {cell.withheld}"] if cell.withheld != "none" else []
    return "".join(f", {p}" for p in parts)


def _split(alpha: Any) -> str:
    return "IID split" if alpha == "iid" else f"Dirichlet alpha {float(alpha):g}"


def _eps(value: Any) -> str:
    """An epsilon as the run ids write it: "inf", or 8 rather than 8.0."""
    return value if isinstance(value, str) else f"{float(value):g}"


def _stem_suffix(cell: Group) -> str:
    generator = f"-gen{_eps(cell.generator_epsilon)}" if cell.generator_epsilon != "none" else ""
    withheld = "".join(f"-no_{a}" for a in cell.withheld.split("+")) if cell.withheld != "none" else ""
    return f"{generator}{withheld}-{cell.method}"


def _curve(rows: list[dict[str, Any]], stem: Path, cell: Group, field: str, unbounded: tuple[str, str], models: tuple[str, ...],
           xlabel: str, title: str) -> list[Path]:
    """AUC and ACC panels against ``field`` (log axis) over the cells that differ from ``cell`` only in it; the
    grid word ``unbounded[0]`` ("inf": no DP, "iid": alpha -> infinity) is drawn at the right end, labelled
    ``unbounded[1]``."""
    word, label = unbounded
    finite = [float(r[field]) for r in rows if r[field] != word]
    end_x = (max(finite) * 4) if finite else 1.0

    def x_of(key: Group) -> float:
        value = getattr(key, field)
        return end_x if value == word else float(value)

    series = _series(rows, x_of, _same_but(field, cell))
    ticks = series["global_auc"]["x"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("auc", "acc")):
        _draw(ax, series, metric, models)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ticks, [label if x == end_x else f"{x:g}" for x in ticks])
        ax.set_xlabel(xlabel)
    _legend_below(fig, axes[0])
    fig.suptitle(title)
    return save_figure(fig, stem)


def privacy_utility(rows: list[dict[str, Any]], stem: Path, *, cell: Group) -> list[Path]:
    """Global model's AUC and ACC against the classifier epsilon (the ensemble and FedAvg as references), over the
    cells that differ from ``cell`` only in it."""
    return _curve(rows, stem, cell, "epsilon", ("inf", "no DP"), ("global", "ensemble", "fedavg", "centralised"),
                  "each hospital's epsilon (every release together, delta 1e-5)",
                  f"{cell.flag}: privacy-utility trade-off ({cell.method}, {_split(cell.alpha)}{_variant(cell)})")


def utility_vs_alpha(rows: list[dict[str, Any]], stem: Path, *, cell: Group) -> list[Path]:
    """Every model's AUC and ACC against the Dirichlet alpha, over the cells that differ from ``cell`` only in it."""
    eps = "no DP" if cell.epsilon == "inf" else f"epsilon {cell.epsilon}"
    return _curve(rows, stem, cell, "alpha", ("iid", "IID"), tuple(STYLES), "Dirichlet alpha of the label split (smaller = more skewed)",
                  f"{cell.flag}: utility against data heterogeneity ({cell.method}, {eps}{_variant(cell)})")


RELEASE_STYLES = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]


def method_comparison(rows: list[dict[str, Any]], stem: Path, *, cell: Group) -> list[Path]:
    """The global model's AUC and ACC per synthesis method (x) and release variant (one marker and line style
    each), over the cells that differ from ``cell`` only in method and withheld artifacts; the ensemble of each
    variant as a horizontal line in the same style."""
    summary = {k: v for k, v in summarise(rows).items() if k._replace(method="", withheld="") == cell._replace(method="", withheld="")}
    methods = list(dict.fromkeys(k.method for k in summary))
    variants = list(dict.fromkeys(k.withheld for k in summary))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("auc", "acc")):
        for v, withheld in enumerate(variants):
            marker, style = RELEASE_STYLES[v % len(RELEASE_STYLES)]
            label = "all released" if withheld == "none" else f"withheld: {withheld}"
            points = [(i + 0.08 * (v - (len(variants) - 1) / 2), summary[k]) for i, m in enumerate(methods)
                      if (k := cell._replace(method=m, withheld=withheld)) in summary]
            means, stds = [s[f"global_{metric}"][0] for _, s in points], [s[f"global_{metric}"][1] for _, s in points]
            ax.errorbar([x for x, _ in points], means, yerr=stds,
                        marker=marker, linestyle=style, color="black", capsize=3, label=f"global, {label}")
            ensemble = [s[f"ensemble_{metric}"][0] for _, s in points]
            if ensemble:
                ax.axhline(sum(ensemble) / len(ensemble), color="grey", linestyle=style, linewidth=1, label=f"ensemble, {label}")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_xlabel("server synthesis method")
        ax.set_ylabel(f"test {metric.upper()} (mean +- std over seeds)")
        ax.grid(True, linestyle=":", linewidth=0.5)
    _legend_below(fig, axes[0])
    eps = "no DP" if cell.epsilon == "inf" else f"classifier epsilon {cell.epsilon}"
    fig.suptitle(f"{cell.flag}: what is released x how the server synthesises ({_split(cell.alpha)}, {eps}"
                 f"{_variant(cell._replace(withheld='none'))})")
    return save_figure(fig, stem)


def label_distribution_name(partition_file: Path) -> str:
    """``labels-<flag>-<split>-s<seed>`` for a ``partition.json``: which study cells' sites it shows."""
    import json

    summary = json.loads(partition_file.read_text())
    part = summary["partition"]
    split = "iid" if part["scheme"] == "iid" else f"a{part['alpha']:g}"
    return f"labels-{summary['flag']}-{split}-s{part['seed']}"


def label_distribution(partition_file: Path, stem: Path) -> list[Path]:
    """Per-site label counts (stacked bars, one hatch pattern per class) from a ``partition.json``."""
    import json

    summary = json.loads(partition_file.read_text())
    sites = summary["sites"]
    counts = [site["label_counts"] for site in sites]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(sites)), 4))
    bottoms = [0] * len(sites)
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
    for label in range(len(counts[0])):
        heights = [c[label] for c in counts]
        ax.bar([f"site {s['site'] + 1}" for s in sites], heights, bottom=bottoms, color="white", edgecolor="black",
               hatch=hatches[label % len(hatches)], label=f"class {label}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    part = summary["partition"]
    ax.set_ylabel("records held by the site (count)")
    split = "IID" if part["scheme"] == "iid" else f"Dirichlet alpha {part['alpha']:g}"
    ax.set_title(f"{summary['flag']}: labels per site ({split}, seed {part['seed']})")
    ax.legend(fontsize=8)
    return save_figure(fig, stem)


def study_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every plot the rows support: a privacy-utility curve per cell but the epsilon, an alpha curve per cell
    but the alpha when more than one alpha was run."""
    cells = list(summarise(rows))
    paths: list[Path] = []
    for cell in sorted({c._replace(epsilon="") for c in cells}, key=str):
        if len({c.epsilon for c in cells if _same_but("epsilon", cell)(c)}) > 1:
            paths += privacy_utility(rows, out / f"privacy-utility-{cell.flag}-{alpha_label(cell.alpha, 'a')}{_stem_suffix(cell)}", cell=cell)
    for cell in sorted({c._replace(method="", withheld="none") for c in cells}, key=str):
        same = [c for c in cells if c._replace(method="", withheld="none") == cell]
        if len({c.method for c in same}) > 1 or len({c.withheld for c in same}) > 1:
            eps = f"eps{_eps(cell.epsilon)}" + (f"-gen{_eps(cell.generator_epsilon)}" if cell.generator_epsilon != "none" else "")
            paths += method_comparison(rows, out / f"release-method-{cell.flag}-{alpha_label(cell.alpha, 'a')}-{eps}", cell=cell)
    for cell in sorted({c._replace(alpha=0.0) for c in cells}, key=str):
        if len({c.alpha for c in cells if _same_but("alpha", cell)(c)}) > 1:
            paths += utility_vs_alpha(rows, out / f"alpha-{cell.flag}-eps{_eps(cell.epsilon)}{_stem_suffix(cell)}", cell=cell)
    return paths

"""``report.html`` of a ``demo`` run and of an ``experiment`` study: the Markdown/JSON results as one page a
reviewer opens in a browser (:mod:`~secure_oneshot.research.html_report`: self-contained, escaped, printable).

The demo page is built from the run folder alone (``results.json``, ``partition.json``,
``server/global/report.json``, ``server/global/synthetic.png``), so it can be rebuilt for any finished run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .html_report import Markup, banner, number, definition_list, image, page, paragraph, section, table, write_page

__all__ = ["demo_report_html", "write_demo_report", "study_report_html", "write_study_report", "plot_alt_text"]

_RELEASES = (("classifier", "classifier weights"), ("bn_statistics", "BatchNorm statistics"),
             ("feature_stats", "DP feature statistics"), ("label_counts", "DP label histogram"), ("generator", "generator weights"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None



def _yes(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "unknown")


# --- the demo ------------------------------------------------------------------------------------


def _metrics_table(metrics: dict[str, dict[str, float]], caption: str) -> Markup:
    rows = [(name, number(m.get("acc")), number(m.get("auc")), number(m.get("balanced_acc"))) for name, m in metrics.items()]
    return table(caption, ["model", "ACC", "AUC", "balanced ACC"], rows, numeric=(1, 2, 3), cls="main")


def _released(report: dict[str, Any] | None, outcomes: list[dict[str, Any]]) -> list[object]:
    parts: list[object] = []
    if report and report.get("sites"):
        rows = [(s.get("name", "?"), s.get("bundle_id", "") or "-", s.get("architecture", "?"), "yes",
                 *(_yes(s.get(key)) for key, _ in _RELEASES[1:])) for s in report["sites"]]
        parts.append(table("Artifacts in each accepted bundle (what left the hospital)",
                           ["hospital", "bundle", "architecture", *(label for _, label in _RELEASES)], rows))
    else:
        parts.append(paragraph("No distillation report (server/global/report.json) in this run.", cls="note"))
    if outcomes:
        rows = [(o.get("file", "?"), o.get("outcome", "?"), o.get("sender", "") or "-", o.get("error", "") or "-", o.get("reason", "") or "-")
                for o in outcomes]
        parts.append(table("The server's ingest decision for every file in its inbox", ["file", "decision", "sender", "error", "reason"], rows))
    return parts


def _label_section(run: Path, partition: dict[str, Any] | None, plot: bool) -> Markup:
    if not partition or not partition.get("sites"):
        return section("Labels held by each hospital", paragraph("No partition.json in this run.", cls="note"))
    sites = partition["sites"]
    classes = max(len(s.get("label_counts", [])) for s in sites)
    rows = [(f"hospital-{int(s['site']) + 1}", s.get("records", "?"), *(s.get("label_counts", []) + [0] * classes)[:classes]) for s in sites]
    part = partition.get("partition", {})
    split = "an even random split (IID)" if part.get("scheme") == "iid" else f"a Dirichlet split over labels (alpha {part.get('alpha')})"
    parts: list[object] = [paragraph(f"The {partition.get('flag', '')} train and validation records were divided among the hospitals by "
                                     f"{split}; smaller alpha means more different label mixes."),
                           table("Records per hospital and label", ["hospital", "records", *(f"class {c}" for c in range(classes))], rows,
                                 numeric=tuple(range(1, classes + 2)))]
    if plot:
        from .plots import label_distribution

        png = next((p for p in label_distribution(run / "partition.json", run / "plots" / "label-distribution") if p.suffix == ".png"), None)
        if png is not None:
            parts.append(image(png, f"Stacked bar chart: label counts held by each of the {len(sites)} hospitals, one hatch pattern per class",
                               "Label counts per hospital (the table above, drawn)."))
    return section("Labels held by each hospital", *parts)


def _privacy_position(results: dict[str, Any], report: dict[str, Any] | None) -> Markup:
    eps = results.get("dp_epsilon")
    outcomes = results.get("outcomes", [])
    quarantined = [o for o in outcomes if o.get("outcome") == "quarantined"]
    generators = bool(report and any(s.get("generator") for s in report.get("sites", [])))
    if eps is not None:
        stats = results.get("stats_epsilon")
        head = banner("ok", f"Differential privacy: epsilon {float(eps):g} per hospital, every release together",
                      "Each hospital trained its classifier with DP-SGD and released only DP artifacts (classifier, DP label "
                      "histogram, decision threshold" + (f", DP feature statistics at epsilon {float(stats):g}" if stats else "")
                      + "); their budgets add up to this epsilon (delta as in each bundle's DP record, 1e-5 by default).",
                      "Unit of privacy: one image (adding or removing one record). There is no patient-level guarantee unless a "
                      "hospital holds at most k images per patient, in which case the patient-level epsilon is k times as large.")
    else:
        head = banner("warn", "No differential privacy in this run",
                      "The hospitals trained without DP: the released weights" + (" and generators" if generators else "")
                      + " carry no formal privacy guarantee. Membership inference and model inversion are possible in principle; "
                      "run `secure-oneshot audit-privacy` at each hospital for empirical evidence before releasing real data.")
    words = [paragraph("The global model, its report and the synthetic images are computed by the server only from what the hospitals "
                       "released (post-processing): they carry the hospitals' guarantee and spend no further privacy budget. "
                       "No patient record left any hospital.")]
    words.append(paragraph(f"Every bundle was signed by its hospital, encrypted to the server and checked against the signed export "
                           f"policy. {len(outcomes) - len(quarantined)} bundle(s) accepted, {len(quarantined)} quarantined"
                           + (" (including the deliberately tampered copy the demo delivers)." if quarantined else ".")))
    position = (report or {}).get("privacy")
    if isinstance(position, dict) and position.get("sites"):  # the sites' signed privacy statements, as the server read them
        rows = [(p.get("site", "?"), p.get("summary", "-"), "-" if p.get("worst_epsilon") is None else f"{float(p['worst_epsilon']):g}",
                 "yes" if p.get("dp") else "no") for p in position["sites"]]
        words += [table("Each hospital's signed privacy statement, as the server read it",
                        ["hospital", "statement", "largest epsilon", "DP on everything released"], rows, numeric=(2,)),
                  paragraph(position.get("global_model", ""))]
    return section("Privacy position", head, *words)


def demo_report_html(run: Path, *, plot_labels: bool = True) -> str:
    """The demo page of run folder ``run`` (see the module docstring for the files it reads); ``plot_labels``
    also draws the label distribution (matplotlib, written under ``run/plots``)."""
    run = Path(run)
    results = _read_json(run / "results.json") or {}
    report = _read_json(run / "server" / "global" / "report.json")
    partition = _read_json(run / "partition.json")
    title = (f"secure-oneshot demo: {results.get('flag', '?')}, {results.get('sites', '?')} hospitals, "
             f"Dirichlet alpha {results.get('alpha', '?')}")
    settings = [("data set", results.get("flag", "?")), ("preset", results.get("preset", "?")), ("hospitals", results.get("sites", "?")),
                ("label split", f"Dirichlet alpha {results.get('alpha', '?')}"), ("seed", results.get("seed", "?")),
                ("DP epsilon per hospital", "none (no DP)" if results.get("dp_epsilon") is None else f"{float(results['dp_epsilon']):g}")]
    if report:
        settings += [("server synthesis", report.get("method", {}).get("method", "?")), ("server preset", report.get("preset", "?")),
                     ("teacher weighting", report.get("teacher_weighting", {}).get("scheme", "?"))]
    seconds = results.get("seconds", {})
    if seconds:
        settings.append(("time", ", ".join(f"{k} {float(v):.0f} s" for k, v in seconds.items())))
    results_part = (_metrics_table(results["metrics"], "Test-split results of every model (higher is better)") if results.get("metrics")
                    else paragraph("No results.json in this run.", cls="note"))
    synthetic = run / "server" / "global" / "synthetic.png"
    parts = [
        section("Results", results_part,
                paragraph("The global model is the last epoch's; the test split was only evaluated, never used to choose a model. "
                          "\"sites\" are the hospitals' own models, the ensemble is the server's teacher, FedAvg averages the weights "
                          "once, and the centralised model (research only) was trained on all records pooled.")),
        section("Settings", definition_list(settings)),
        section("What each hospital released", *_released(report, results.get("outcomes", []))),
        _label_section(run, partition, plot_labels),
        section("Synthetic images: from noise to realistic",
                image(synthetic, "Grid of synthetic images the server generated: each column one image, rows from random noise (top) "
                                 "to the final image (bottom)", "The server's synthesis, from noise (top row) to realistic (bottom row).")
                if synthetic.is_file() else paragraph("No synthetic.png in this run.", cls="note")),
        _privacy_position(results, report),
    ]
    paths = results.get("paths", {})
    if paths:
        parts.append(section("Files of this run", definition_list(sorted(paths.items()))))
    return page(title, *parts, subtitle="A one-shot federated study, end to end, on simulated hospitals.",
                footer="Written by secure-oneshot demo. Self-contained page: it loads nothing from the network.")


def write_demo_report(run: Path, *, plot_labels: bool = True) -> Path:
    """``run/report.html`` (atomically)."""
    return write_page(Path(run) / "report.html", demo_report_html(run, plot_labels=plot_labels))


# --- a study -------------------------------------------------------------------------------------


_UTILITY = {"sites AUC": "sites_auc", "ensemble AUC": "ensemble_auc", "ensemble ACC": "ensemble_acc", "FedAvg AUC": "fedavg_auc",
            "global AUC": "global_auc", "global ACC": "global_acc", "global bal. ACC": "global_balanced_acc",
            "centralised ACC": "centralised_acc"}
_PRIVACY = {"MIA AUC (worst site)": "mia_sites_auc_max", "empirical epsilon >= (worst site)": "mia_sites_epsilon_max",
            "MIA AUC (global)": "mia_global_auc", "LiRA AUC (worst site)": "lira_sites_auc_max",
            "MIA AUC (worst generator)": "mia_generators_auc_max", "generator near-copies (worst)": "generator_near_copies_max",
            "synthetic near-copies": "synthetic_near_copies"}
_PLOTS = (("privacy-utility-", "Privacy-utility trade-off"), ("alpha-", "Utility against data heterogeneity"),
          ("release-method-", "What is released and how the server synthesises"), ("labels-", "Labels held by each site"),
          ("trajectory-", "Synthesis trajectories"))


def _mean_std(stats: tuple[float, float, int]) -> str:
    return "-" if not stats[2] or math.isnan(stats[0]) else f"{stats[0]:.3f} ± {stats[1]:.3f}"


def _cell_name(key: Any) -> str:
    from .study_table import alpha_label

    alpha = alpha_label(key.alpha)
    parts = [key.flag, "IID split" if alpha == "iid" else f"alpha {alpha}",
             "no DP" if str(key.epsilon) == "inf" else f"epsilon {key.epsilon}"]
    if key.generator_epsilon != "none":
        parts.append(f"generator epsilon {key.generator_epsilon}")
    if key.withheld != "none":
        parts.append(f"withheld {key.withheld}")
    return ", ".join([*parts, key.method])


def plot_alt_text(stem: str) -> str:
    """What a study plot named ``stem`` shows, in words (its ``alt`` text)."""
    for prefix, what in (("privacy-utility-", "test AUC (left) and ACC (right) of the global, ensemble, one-shot FedAvg and centralised "
                                              "models against each hospital's epsilon, mean with error bars over seeds"),
                         ("alpha-", "test AUC and ACC of every model against the Dirichlet alpha of the label split, mean with "
                                    "error bars over seeds"),
                         ("release-method-", "the global model's test AUC and ACC per server synthesis method, one line style per "
                                             "variant of what the sites release"),
                         ("labels-", "stacked bars of the label counts each site holds, one hatch pattern per class"),
                         ("trajectory-", "a grid of synthetic images from noise (top row) to realistic (bottom row)")):
        if stem.startswith(prefix):
            return f"{stem.removeprefix(prefix)}: {what}"
    return f"study plot {stem}"


def study_report_html(name: str, rows: list[dict[str, Any]], plots: list[Path], *, privacy_audit: bool = False) -> str:
    """A study's page: per-cell tables (mean ± std over seeds), the privacy evidence when audited, every PNG plot."""
    from .study_table import summarise

    summary = summarise(rows)
    utility_rows = [(_cell_name(key), s["global_auc"][2], *(_mean_std(s[f]) for f in _UTILITY.values()),
                     "-" if math.isnan(s["epsilon_composed_max"][0]) else f"{s['epsilon_composed_max'][0]:.2f}")
                    for key, s in summary.items()]
    parts: list[object] = [
        paragraph(f"{len(rows)} finished (cell, seed) runs; each value is the mean ± standard deviation over the cell's seeds. "
                  "The global model is the last epoch's; the test split is only evaluated. \"withheld\": artifacts the sites left out "
                  "of their bundles. Composed epsilon: the largest of any site's releases together (\"-\": no DP)."),
        section("Utility on the test split", table("Test-split utility per cell (mean ± std over seeds)",
                                                  ["cell", "seeds", *_UTILITY, "composed epsilon"], utility_rows,
                                                  numeric=tuple(range(1, len(_UTILITY) + 3)), cls="main")),
    ]
    if privacy_audit or any(s[f][2] for s in summary.values() for f in _PRIVACY.values()):
        privacy_rows = [(_cell_name(key), *(_mean_std(s[f]) for f in _PRIVACY.values())) for key, s in summary.items()]
        parts.append(section("Privacy evidence", table("Membership inference and near-copies per cell (mean ± std over seeds)",
                                                       ["cell", *_PRIVACY], privacy_rows, numeric=tuple(range(1, len(_PRIVACY) + 1))),
                             paragraph("An attack AUC of 0.5 is guessing. The empirical epsilon is what the attack proves (a lower "
                                       "bound), to be read next to the accountant's epsilon (an upper bound).")))
    pngs = [p for p in plots if p.suffix == ".png"]
    for prefix, title in _PLOTS:
        chosen = sorted(p for p in pngs if p.stem.startswith(prefix))
        if chosen:
            parts.append(section(title, *(image(p, plot_alt_text(p.stem), p.stem) for p in chosen)))
    others = sorted(p for p in pngs if not any(p.stem.startswith(prefix) for prefix, _ in _PLOTS))
    if others:
        parts.append(section("Other plots", *(image(p, plot_alt_text(p.stem), p.stem) for p in others)))
    return page(f"Study {name}", *parts, subtitle="A privacy-utility study of one-shot federated learning.",
                footer="Written by secure-oneshot experiment. Self-contained page: it loads nothing from the network.")


def write_study_report(out: Path, name: str, rows: list[dict[str, Any]], plots: list[Path], *, privacy_audit: bool = False) -> Path:
    """``out/report.html`` (atomically)."""
    return write_page(Path(out) / "report.html", study_report_html(name, rows, plots, privacy_audit=privacy_audit))

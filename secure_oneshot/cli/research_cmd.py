"""``secure-oneshot audit-privacy`` (privacy evidence for a site's released classifier and generator) and
``secure-oneshot experiment`` (a privacy-utility study grid)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.threads import add_threads_option, apply_threads, prefer_passive_openmp
from .output import Result

__all__ = ["register"]


def _audit_privacy(args: argparse.Namespace) -> Result:
    prefer_passive_openmp()   # before torch loads (see _internal/threads.py)
    apply_threads(args.threads)
    from ..research.privacy_audit import audit_model_dir, markdown_report

    pairs = str(Path(args.out).with_name(Path(args.out).stem + "-closest-pairs.png")) if args.out else None
    report = audit_model_dir(args.model, data_root=args.data_root, shadows=args.shadows, seed=args.seed,
                             inversion_steps=args.inversion_steps, pairs_png=pairs)
    if args.out and args.out.endswith(".html"):
        from ..research.html_audit import write_privacy_audit

        write_privacy_audit(Path(args.out), report, Path(pairs) if pairs else None)
    elif args.out:
        text = markdown_report(report) if args.out.endswith(".md") else json.dumps(report, indent=2) + "\n"
        atomic_write_bytes(Path(args.out), text.encode("utf-8"))
    eps = report["accountant_epsilon"]
    lines = [f"membership inference against {report['model']} ({report['members']} members, {report['non_members']} non-members)",
             f"  {'attack':32s} {'AUC':>6s} {'TPR@1%':>7s} {'TPR@0.1%':>9s} {'eps >=':>7s}"]
    attacks = [*report["attacks"], *(report["generator"]["attacks"] if report["generator"] else [])]
    lines += [f"  {a['name']:32s} {a['auc']:6.3f} {a['tpr_at_1pct_fpr']:7.3f} {a['tpr_at_01pct_fpr']:9.3f} {a['epsilon_lower_bound']:7.2f}"
              for a in attacks]
    lines.append(f"  accountant epsilon: {eps:.3g} (an upper bound; the attacks give lower bounds)" if eps is not None
                 else "  accountant epsilon: none (not trained with DP)")
    lines += [f"  inversion ({r['prior']} prior): median distance to the nearest training image {r['median_train_distance']:.3f}, "
              f"ratio to the nearest unseen image {r['median_ratio_train_to_unseen']:.2f}, near-copies {r['near_copies']}/{r['images']}"
              for r in report["inversion"]]
    if report["generator"]:
        copies = report["generator"]["memorisation"]
        lines.append(f"  generator samples: {copies['near_copies']}/{copies['images']} near-copies of training images "
                     f"(median distance {copies['median_train_distance']:.3f}, ratio to unseen {copies['median_ratio']:.2f})")
    if args.out:
        lines.append(f"  report: {args.out}")
        if report["generator"]:
            lines.append(f"  generator samples beside their nearest training images: {pairs}")
    return Result(report, lines)


def _experiment(args: argparse.Namespace) -> Result:
    import sys

    prefer_passive_openmp()   # before torch loads (see _internal/threads.py)
    apply_threads(args.threads)
    from ..research.experiment import load_study, run_study
    from ..research.html_study import write_study_report
    from ..research.plots import label_distribution, label_distribution_name, study_plots

    study = load_study(args.config)
    out = Path(args.out) if args.out else Path("studies") / study.name
    rows = run_study(study, out, data_root=args.data_root, max_cells=args.max_cells, shard=args.shard,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
    plots = study_plots(rows, out / "plots") if rows else []
    for partition in sorted((out / "cache").glob("*/partition.json")):  # site sets differing only in DP share a name: one plot
        plots += label_distribution(partition, out / "plots" / label_distribution_name(partition))
    plots += _trajectories(out)
    write_study_report(out, study.name, rows, plots, privacy_audit=study.privacy_audit)
    total = len(study.cells())
    lines = [f"study {study.name}: {len(rows)} of {total} (cell, seed) runs finished -> {out}",
             *(f"  {name:12s} {out / name}" for name in ("results.csv", "results.json", "report.md", "report.html")),
             *(f"  plot         {p}" for p in plots if p.suffix == ".png")]
    if len(rows) < total:
        lines.append("  not finished: run the same command again to resume")
    return Result({"out": str(out), "finished": len(rows), "total": total, "plots": [str(p) for p in plots]}, lines)


def _shard(text: str) -> tuple[int, int]:
    """argparse type: ``K/N`` with 1 <= K <= N (ASCII digits)."""
    match = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"{text!r} is not a share K/N with 1 <= K <= N, e.g. 1/2")
    return int(match[1]), int(match[2])


def _trajectories(out: Path) -> list[Path]:
    """Each run's noise -> realistic synthesis grid, gathered under plots/ (one per cell and method, first seed)."""
    import shutil

    copied = []
    for grid in sorted((out / "cells").glob("*-s*/server/global/synthetic.png")):
        cell = grid.parents[2].name
        if cell.rsplit("-s", 1)[0] in {p.stem.removeprefix("trajectory-") for p in copied}:
            continue  # one seed per cell is enough to look at
        target = out / "plots" / f"trajectory-{cell.rsplit('-s', 1)[0]}.png"
        shutil.copyfile(grid, target)
        copied.append(target)
    return copied


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    audit = commands.add_parser("audit-privacy", help="membership-inference audit of a trained model directory (runs at the site)",
                                parents=[common])
    audit.add_argument("--model", required=True, metavar="DIR", help="model directory written by `train`")
    audit.add_argument("--data-root", metavar="DIR", help="the MedMNIST folder the site trained from")
    audit.add_argument("--shadows", type=int, default=0, metavar="K",
                       help="also run offline LiRA with K shadow models (>= 2; a released generator gets K shadow generators too)")
    audit.add_argument("--inversion-steps", type=int, default=0, metavar="N",
                       help="also invert the model (N steps, with and without the BN prior) and compare with the training images")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--out", metavar="FILE", help="write the report: FILE.html (self-contained page) or FILE.md as a page for a DPIA, anything else as JSON")
    add_threads_option(audit)
    audit.set_defaults(handler=_audit_privacy)

    experiment = commands.add_parser("experiment", help="run a privacy-utility study grid through the real pipeline (resumable)",
                                     parents=[common])
    experiment.add_argument("config", metavar="STUDY.toml",
                            help="study config (examples/study-quick-cpu.toml). Its [server] preset is cpu by default; gpu "
                                 "is a reduced preset (200 inversion steps, 40 epochs), not the published method: only "
                                 "paper (with [site] preset fedisca) runs the published recipe")
    experiment.add_argument("--out", metavar="DIR", help="study folder (default studies/NAME); rerun to resume")
    experiment.add_argument("--data-root", metavar="DIR", help="MedMNIST folder (overrides the config)")
    experiment.add_argument("--max-cells", type=int, metavar="N", help="stop after N newly computed runs (resume later)")
    experiment.add_argument("--shard", type=_shard, metavar="K/N",
                            help="run only share K of N of the runs (1/2 and 2/2 in two processes on one --out folder use two "
                                 "cores; runs that share site models stay in one share); the report covers every finished run")
    add_threads_option(experiment)
    experiment.set_defaults(handler=_experiment)

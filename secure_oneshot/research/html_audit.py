"""Pages for a data-protection review: the ``audit-privacy`` report as a DPIA-style page, and an audit log
(``secure-oneshot audit show --html``) with its verification status up front.

Both are :mod:`~secure_oneshot.research.html_report` pages (self-contained, escaped, printable).  Standard library
only, so that reading an audit log never loads numpy or torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .html_report import Markup, banner, number, definition_list, image, page, paragraph, section, table, write_page

__all__ = ["privacy_audit_html", "write_privacy_audit", "LogStatus", "audit_log_html", "write_audit_log", "attack_verdict"]

WEAK_AUC, CLEAR_AUC = 0.55, 0.6
"""Attack AUC bands for the plain-words verdict: below WEAK_AUC close to guessing, from CLEAR_AUC a clear signal."""
DETAIL_CHARS = 300



def attack_verdict(auc: float) -> tuple[str, str]:
    """(banner kind, plain words) for the strongest attack's AUC."""
    if auc < WEAK_AUC:
        return "ok", (f"The strongest attack was close to guessing (AUC {auc:.3f}; 0.5 is a coin flip): on this evidence an "
                      "attacker holding the released model can hardly tell whether a given image was used to train it.")
    if auc < CLEAR_AUC:
        return "warn", (f"The strongest attack did a little better than guessing (AUC {auc:.3f}; 0.5 is a coin flip): "
                        "membership leaks weakly. Differential privacy, or a smaller epsilon, bounds it.")
    return "bad", (f"The strongest attack told training images from unseen ones clearly better than guessing (AUC {auc:.3f}; "
                   "0.5 is a coin flip): the released model leaks membership. Train with differential privacy before release.")


def privacy_audit_html(report: dict[str, Any], pairs_png: Path | None = None) -> str:
    """The ``audit-privacy`` report as a page for a data-protection impact assessment; ``pairs_png``: the generator
    samples beside their nearest training images, when that file exists."""
    eps = report.get("accountant_epsilon")
    delta = report.get("delta")
    attacks = [("classifier", a) for a in report.get("attacks", [])]
    generator = report.get("generator")
    if generator:
        attacks += [("generator", a) for a in generator.get("attacks", [])]
    who = report.get("site") or report.get("model", "?")
    parts: list[object] = []
    if attacks:
        best = max(attacks, key=lambda ta: float(ta[1].get("auc", 0.0)))
        kind, words = attack_verdict(float(best[1].get("auc", 0.0)))
        parts.append(banner(kind, "Summary in plain words", words,
                            f"Formal guarantee: {'epsilon %.3g (delta %.0e) from the DP accountant, an upper bound on what any attack can achieve' % (eps, delta) if eps is not None else 'none: the classifier was not trained with differential privacy'}.",
                            "A failed attack is evidence, not proof: a stronger attack may do better. The empirical epsilon below is "
                            "what these attacks prove; the accountant's epsilon is what DP guarantees."))
    parts.append(section("What was audited", definition_list([
        ("site", report.get("site") or "-"), ("model directory", report.get("model", "?")),
        ("accountant epsilon (classifier)", "none (no DP)" if eps is None else f"{float(eps):.3g}"), ("delta", delta if delta is not None else "-"),
        ("members (training images tested)", report.get("members", "?")), ("non-members (never trained on)", report.get("non_members", "?")),
        ("protocol", report.get("protocol", "-"))])))
    rows = [(f"{target}: {a.get('name', '?')}", number(a.get("auc")), number(a.get("tpr_at_1pct_fpr")), number(a.get("tpr_at_01pct_fpr")),
             number(a.get("epsilon_lower_bound"), 2)) for target, a in attacks]
    parts.append(section("Membership inference", table(
        "Membership-inference attacks against the released model(s)",
        ["target and attack", "AUC", "TPR at 1% FPR", "TPR at 0.1% FPR", "empirical epsilon >="], rows, numeric=(1, 2, 3, 4), cls="main"),
        paragraph("AUC: how often the attack ranks a training image above an unseen one (0.5 is guessing, 1 is always). TPR at a "
                  "low FPR: the share of training images the attacker identifies while wrongly accusing only 1% (or 0.1%) of unseen "
                  "ones, the number that matters for individuals. Empirical epsilon: the privacy loss these attacks prove with 95% "
                  "confidence (Clopper-Pearson, Bonferroni over thresholds).")))
    if generator and generator.get("lira_skipped"):
        parts.append(paragraph(f"Generator LiRA not run: {generator['lira_skipped']}.", cls="note"))
    if report.get("inversion"):
        inv = [(r.get("prior", "?"), r.get("images", "?"), number(r.get("median_train_distance")), number(r.get("median_ratio_train_to_unseen"), 2),
                r.get("near_copies", "?")) for r in report["inversion"]]
        parts.append(section("Model inversion by the server", table(
            "Reconstructions by model inversion compared with the site's training images",
            ["prior", "images", "median distance to nearest training image", "ratio to nearest unseen image", "near-copies"], inv,
            numeric=(1, 2, 3, 4)),
            paragraph("Distances are RMS pixel differences on the [-1, 1] scale; a ratio below 1 means the reconstructions are closer "
                      "to the site's own images than to images it never saw.")))
    if generator and generator.get("memorisation"):
        m = generator["memorisation"]
        gen_parts: list[object] = [paragraph(
            f"{m.get('near_copies', '?')} of {m.get('images', '?')} generator samples are near-copies of a training image "
            f"(distance below {m.get('copy_distance', '?')} and ratio below {m.get('ratio', '?')}); median distance "
            f"{number(m.get('median_train_distance'))}, median ratio to unseen images {number(m.get('median_ratio'), 2)}.")]
        if pairs_png is not None and Path(pairs_png).is_file():
            gen_parts.append(image(Path(pairs_png), "Pairs of images: each generator sample beside its nearest training image",
                                   "Generator samples (left of each pair) beside their nearest training images."))
        parts.append(section("Generator samples", *gen_parts))
    return page(f"Privacy audit: {who}", *parts, subtitle="Evidence for a data-protection impact assessment (DPIA).",
                footer="Written by secure-oneshot audit-privacy at the site. Nothing in this audit left the site: it is a set of numbers.")


def write_privacy_audit(path: Path, report: dict[str, Any], pairs_png: Path | None = None) -> Path:
    return write_page(Path(path), privacy_audit_html(report, pairs_png))


# --- an audit log --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogStatus:
    """What is known about a log's integrity: ``verified`` (True: chain and signatures checked; False: checked and
    failed; None: not checked), with the signer and the failure's message."""

    verified: bool | None
    signer: str = ""
    problem: str = ""
    last_hash: str = ""


def _status_banner(status: LogStatus, count: int) -> Markup:
    if status.verified is True:
        return banner("ok", "VERIFIED: chain intact, every record signed by the log's writer",
                      f"{count} records checked against {status.signer}: sequence numbers, hash chain and Ed25519 signatures.",
                      f"Last hash {status.last_hash}. Deleting the newest records is only detected against a head written down "
                      "elsewhere (secure-oneshot audit head).")
    if status.verified is False:
        return banner("bad", "VERIFICATION FAILED: this log may have been tampered with",
                      f"Checked against {status.signer}: {status.problem}",
                      "The records below are shown as read; do not rely on them. Keep the log read-only and compare it with its "
                      "last backup.")
    return banner("warn", "NOT VERIFIED: the records below were read, not checked",
                  "Run secure-oneshot audit show --html with --signer FILE.pub (the log writer's public identity) to check the "
                  "hash chain and signatures.")


def _details(record: Any) -> str:
    """The event's key facts in one cell: policy, recipients, DP epsilon, other details (cut at DETAIL_CHARS)."""
    event = record.event
    facts = []
    if event.policy_id:
        facts.append(f"policy {event.policy_id}" + ("" if event.policy_version is None else f" v{event.policy_version}"))
    if event.bundle_id:
        facts.append(f"bundle {event.bundle_id}")
    if event.recipients:
        facts.append(f"recipients {', '.join(r[:8] for r in event.recipients)}")
    eps = _epsilons(event.dp)
    if eps:
        facts.append(f"DP epsilon {eps}")
    for key, value in event.details.items():
        facts.append(f"{key}: {value if isinstance(value, str) else json.dumps(value, sort_keys=True)}")
    text = "; ".join(facts) or "-"
    return text if len(text) <= DETAIL_CHARS else text[:DETAIL_CHARS - 3] + "..."


def _epsilons(dp: Any) -> str:
    """The epsilons in an audit record's DP object (decimal strings): one, or ``artifact epsilon`` pairs."""
    if not isinstance(dp, dict) or not dp:
        return ""
    if "epsilon" in dp:  # one record
        return str(dp["epsilon"])
    # per artifact: a record, or the epsilon alone (as export writes it)
    found = [f"{name} {record['epsilon'] if isinstance(record, dict) else record}" for name, record in dp.items()
             if not isinstance(record, dict) or "epsilon" in record]
    return ", ".join(found)


def audit_log_html(log: str, records: Sequence[Any], status: LogStatus, total: int | None = None) -> str:
    """The page of ``records`` (:class:`~secure_oneshot.audit.AuditRecord`) of the log at ``log``."""
    total = len(records) if total is None else total
    outcomes = {o: sum(r.event.outcome == o for r in records) for o in ("ok", "refused", "error")}
    rows = [(r.seq, r.time, f"{r.actor_name} ({r.actor[:8]})", r.event.action, r.event.outcome, r.event.reason or "-", _details(r))
            for r in records]
    summary = definition_list([("log file", log), ("records", f"{len(records)} shown of {total}"),
                               ("outcomes", ", ".join(f"{n} {o}" for o, n in outcomes.items())),
                               ("writers", ", ".join(sorted({f"{r.actor_name} ({r.actor})" for r in records})) or "-")])
    events = table("Every event in the log, oldest first (time in UTC)", ["seq", "time (UTC)", "actor", "action", "outcome", "reason",
                                                                           "details"], rows, numeric=(0,), nowrap=(1,), cls="main") if records else \
        paragraph("The log holds no records.", cls="note")
    name = Path(log).name
    return page(f"Audit log: {name}", _status_banner(status, len(records)), section("Summary", summary), section("Events", events),
                subtitle="An append-only, hash-chained, signed record of what was sent, refused and accepted.",
                footer="Written by secure-oneshot audit show --html. Self-contained page: it loads nothing from the network.")


def write_audit_log(path: Path, log: str, records: Sequence[Any], status: LogStatus, total: int | None = None) -> Path:
    return write_page(Path(path), audit_log_html(log, records, status, total))

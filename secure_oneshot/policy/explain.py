"""Render decisions for people (a plain table that reads in black and white) and for machines (JSON)."""

from __future__ import annotations

from collections.abc import Sequence

from .evaluate import Decision, Evaluation

__all__ = ["decision_table", "metadata_table", "evaluation_json", "denial_summary"]

_ORDER = {"policy": 0, "recipient": 1, "artifact": 2, "structure": 3, "metadata": 4, "dp": 5, "statement": 6, "tensor": 7, "bundle": 8}


def decision_table(decisions: Sequence[Decision]) -> list[str]:
    """One line per decision: ALLOW/DENY, what, which rule, why; denials are marked with '!'."""
    rows = sorted(decisions, key=lambda d: (_ORDER.get(d.kind, 9), d.subject, d.rule))
    width = max((len(d.subject) for d in rows), default=10)
    width = min(max(width, 10), 60)
    rule_width = min(max((len(d.rule) for d in rows), default=6), 36)
    lines = [f"  {'':1} {'decision':8} {'kind':9} {'subject':{width}} {'rule':{rule_width}} reason"]
    for d in rows:
        mark = " " if d.allowed else "!"
        lines.append(f"  {mark} {'ALLOW' if d.allowed else 'DENY':8} {d.kind:9} {d.subject:{width}} {d.rule:{rule_width}} {d.reason}")
    return lines


def metadata_table(evaluation: Evaluation) -> list[str]:
    """The "metadata" section: every model-record field, its value, and whether it is sent, kept or refused."""
    review = evaluation.metadata
    if review is None:
        return []
    width = min(max((len(f.path) for f in review.fields), default=10), 60)
    lines = ["metadata (what of the model record goes into the signed manifest):"]
    for f in review.fields:
        mark = " " if f.allowed else "!"
        lines.append(f"  {mark} {f.outcome.upper():7} {f.path:{width}} {f.value}  ({f.reason})")
    return lines


def denial_summary(evaluation: Evaluation) -> str:
    denied = evaluation.denied
    first = "; ".join(f"{d.subject}: {d.reason}" for d in denied[:3])
    more = f" (and {len(denied) - 3} more)" if len(denied) > 3 else ""
    return f"{len(denied)} denial(s): {first}{more}"


def evaluation_json(evaluation: Evaluation) -> dict[str, object]:
    return {
        "allowed": evaluation.allowed,
        "decisions": [d.to_json() for d in evaluation.decisions],
        "epsilons": {k: repr(v) for k, v in evaluation.epsilons.items()},
        "payload_bytes": evaluation.payload_bytes,
        "metadata": [f.__dict__ for f in evaluation.metadata.fields] if evaluation.metadata else [],
    }

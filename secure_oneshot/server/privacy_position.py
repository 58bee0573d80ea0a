"""The global model's privacy position, from the privacy statements of the bundles it was distilled from.

Distillation reads only what the sites released (their models and, where released, feature statistics, label
counts and generators); the global model is post-processing of those releases.  It therefore adds no privacy
cost of its own and each site's guarantee stands exactly as that site stated it: the position is the list of
the sites' statements, with the sites whose release carries no DP guarantee named plainly.  Research runs
from model directories have no statements; the position then says so instead of claiming anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..policy.privacy_statement import epsilon_of, public_summary, summary_line

__all__ = ["POST_PROCESSING", "privacy_position", "position_markdown"]

POST_PROCESSING = ("The global model is computed from the site releases alone (post-processing): it adds no privacy "
                   "cost, and each hospital's guarantee below stands as that hospital stated it.")


def _worst_epsilon(statement: Mapping[str, Any]) -> float | None:
    """The largest epsilon the statement gives: an artifact's, the bundle's composition, or with earlier releases."""
    values = [epsilon_of(e["epsilon"]) for e in statement["dp"].values()]
    values += [epsilon_of(c["epsilon"]) for c in statement["composed"]["bundle"]]
    values += [epsilon_of(c["epsilon"]) for c in statement["composed"]["with_earlier_releases"] if c["epsilon"] is not None]
    return max(values) if values else None


def privacy_position(statements: Sequence[tuple[str, str, Mapping[str, Any] | None]]) -> dict[str, Any]:
    """``statements``: ``(site, bundle_id, parsed statement or None)`` per site used, in report order."""
    sites = []
    for site, bundle_id, statement in statements:
        if statement is None:
            sites.append({"site": site, "bundle_id": bundle_id, "statement": None, "summary": "no privacy statement",
                          "dp": False, "worst_epsilon": None})
            continue
        undp = [a["artifact"] for a in statement["released"]["artifacts"] if not a["dp"]]
        sites.append({"site": site, "bundle_id": bundle_id, "statement": public_summary(statement), "summary": summary_line(statement),
                      "dp": bool(statement["dp"]) and not undp, "worst_epsilon": _worst_epsilon(statement)})
    stated = [s for s in sites if s["statement"] is not None]
    return {
        "global_model": POST_PROCESSING if stated else "No site sent a privacy statement (model directories or bundles "
                                                       "sealed without one): nothing is claimed about privacy.",
        "sites": sites,
        "sites_without_dp": [s["site"] for s in sites if not s["dp"]],
    }


def position_markdown(position: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the distillation report."""
    lines = ["## Privacy position", "", position["global_model"], ""]
    for s in position["sites"]:
        lines.append(f"- {s['site']}: {s['summary']}")
    if position["sites_without_dp"]:
        lines += ["", "Without a DP guarantee on everything they released: " + ", ".join(position["sites_without_dp"]) + "."]
    return lines

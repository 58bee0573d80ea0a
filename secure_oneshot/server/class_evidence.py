"""Whether any hospital's released label counts show records on both sides of each class, beyond their DP noise.

A site model learns to tell class ``c`` from the rest only if its hospital held records of both.  A model trained
on one class answers that class for its own images, and its ranking of the other class's images is whatever its
network does out of distribution: an accident of architecture and noise, not evidence.  When every hospital held
one class, every teacher ranking is such an accident, and so is the global model distilled from it: on
PneumoniaMNIST with Dirichlet-0.1 label skew the study measured one such draw at 0.148 test AUC (ranked the wrong
way round) and another at 0.826, from the same code (benchmarks/RESULTS.md).  No weighting of the teachers can
repair this, because no teacher holds the information.

The server can see it coming from what the hospitals released.  Site ``s`` with released counts ``n~[s, k] =
n[s, k] + N(0, sigma_s**2)`` (:mod:`~secure_oneshot.client.label_counts`; ``sigma_s`` from the artifact's own DP
record) shows evidence for class ``c`` when both sides clear the noise:

    n~[s, c] >= Z * sigma_s   and   sum_{k != c} n~[s, k] >= Z * sigma_s * sqrt(K - 1)

(the rest's noise is a sum of ``K - 1`` draws).  ``Z = 3`` (``EVIDENCE_Z``): a one-class hospital passes by noise
alone with probability 0.13 % per test.  Counts released without DP (no record) have ``sigma = 0`` and need at
least one record on each side.  Class ``c`` is *supported* when at least one site shows evidence for it.  All of
this is post-processing of the released counts: no privacy cost.

What :func:`check_class_evidence` does with an unsupported class is the run's ``class_evidence`` choice:

* ``require`` (the default): refuse to distil, before any work, with :class:`~secure_oneshot.errors.EvidenceError`.
* ``report``: distil anyway and state the finding in the run's report (for research on such splits).

It cannot judge when a site released no label counts (nothing is known of its classes): the finding is then
"unknown" and the run goes on under either choice.  Nor does it judge multi-label tasks, whose counts are per label.
What it does not catch: a site that misreports its counts (they are its own signed claim, like its weights); a
hospital with both classes whose model is still poor; and a one-class federation whose
noise happens to pass (0.13 % per one-class hospital and class; the utility study met one, a 3.6-sigma draw, whose
global model ranked at 0.150 AUC: benchmarks/RESULTS.md).  It refuses some splits where hospitals did hold both
classes but too few records of one of them for the counts' noise (with the default label-count epsilon, sigma is
35 records, so a minority under 105 records is not shown); a larger label-count epsilon lowers that bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, EvidenceError
from .site_models import SiteModel

__all__ = ["EVIDENCE_CHOICES", "EVIDENCE_Z", "ClassEvidence", "class_evidence", "check_class_evidence", "shown_smaller_side", "shows_both_sides"]

EVIDENCE_CHOICES = ("require", "report")
EVIDENCE_Z = 3.0   # noise standard deviations each side of a class must clear (one-sided false pass 0.13 % per test)


@dataclass(frozen=True)
class ClassEvidence:
    """Per class, the sites whose released counts show records on both sides of it (``None``: cannot judge)."""

    supporting: tuple[tuple[str, ...], ...] | None   # per class: names of the sites showing evidence
    reason: str = ""                                  # why it cannot judge, when supporting is None

    @property
    def unsupported(self) -> list[int]:
        """Classes no site shows evidence for (empty when it cannot judge)."""
        return [] if self.supporting is None else [c for c, names in enumerate(self.supporting) if not names]

    def record(self) -> dict[str, Any]:
        """The finding for the run's report."""
        if self.supporting is None:
            return {"judged": False, "reason": self.reason}
        return {"judged": True, "z": EVIDENCE_Z, "supporting_sites": [list(names) for names in self.supporting],
                "unsupported_classes": self.unsupported}


def class_evidence(sites: list[SiteModel]) -> ClassEvidence:
    """Which sites' released label counts show each class and its complement (see the module docstring)."""
    if any(s.multi_label for s in sites):
        return ClassEvidence(None, "multi-label task: counts are per label")
    missing = [s.name for s in sites if s.label_counts is None]
    if missing:
        return ClassEvidence(None, "no label counts from " + ", ".join(missing))
    classes = int(sites[0].label_counts.numel())
    supporting: list[list[str]] = [[] for _ in range(classes)]
    for site in sites:
        shown = shows_both_sides(site.label_counts.detach().double().cpu().reshape(-1), site.label_counts_noise)
        for c in range(classes):
            if shown[c]:
                supporting[c].append(site.name)
    return ClassEvidence(tuple(tuple(names) for names in supporting))


def shows_both_sides(counts: torch.Tensor, sigma: float) -> torch.Tensor:
    """The rule for one site, on released counts of shape ``(..., classes)`` with noise standard deviation ``sigma``:
    per class, whether its count clears ``EVIDENCE_Z`` sigma and the rest's count ``EVIDENCE_Z`` sigma sqrt(K - 1)
    (the rest sums K - 1 noisy counts); at least one record each when the counts are exact (sigma 0)."""
    classes = counts.shape[-1]
    rest = counts.sum(dim=-1, keepdim=True) - counts
    return (counts >= max(EVIDENCE_Z * sigma, 1.0)) & (rest >= max(EVIDENCE_Z * sigma * math.sqrt(classes - 1), 1.0))


def check_class_evidence(sites: list[SiteModel], choice: str = "require") -> ClassEvidence:
    """:func:`class_evidence`, raising under ``require`` when a class has no supporting site.

    Raises:
        ConfigError: ``choice`` is not one of ``EVIDENCE_CHOICES``.
        EvidenceError: ``require`` and some class has no supporting site.
    """
    if choice not in EVIDENCE_CHOICES:
        raise ConfigError(f"unknown class-evidence choice {choice!r}", hint=f"use one of {', '.join(EVIDENCE_CHOICES)}")
    evidence = class_evidence(sites)
    if choice == "require" and evidence.unsupported:
        largest = max(shown_smaller_side(s) for s in sites)
        raise EvidenceError(
            f"no hospital's released label counts show records of both sides of class(es) "
            f"{', '.join(map(str, evidence.unsupported))} beyond their noise (largest smaller side {largest[0]:.0f} records, "
            f"{largest[1]:.1f} sigma; {EVIDENCE_Z:g} needed): the site models cannot rank these classes, and a global model "
            "distilled from them would rank by accident", data=evidence.record())
    return evidence


def shown_smaller_side(site: SiteModel) -> tuple[float, float]:
    """The largest over classes of the site's smaller side (released count of the class or of the rest, negatives as 0):
    in records, and in noise standard deviations."""
    counts = site.label_counts.detach().double().cpu().reshape(-1).clamp(min=0)
    smaller = float(torch.minimum(counts, counts.sum() - counts).max())
    return smaller, smaller / site.label_counts_noise if site.label_counts_noise > 0 else math.inf

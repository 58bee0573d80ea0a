"""Move each site's decision point to the federation's class shares before the consensus judges it (post-processing).

Why: a DP site trained on a skewed local label mix often decides one class for nearly every public image while
still ranking the images well.  Measured on the utility study's cached DP site sets (PneumoniaMNIST, 5 hospitals,
Dirichlet 0.5; ``benchmarks/RESULTS.md``): at epsilon 2, seed 0, three of five sites called every public image
"normal" and one called every image "pneumonia", although one of the constant ones ranks the test images at AUC
0.874.  Cohen's kappa of a (near-)constant decision vector is 0, or unstable when one image in a thousand differs,
so ``consensus`` cannot see such a site, and when most sites are constant its fixed point settles on a one-class
teacher (that set's teacher: ACC 0.625, AUC 0.820; the equal teacher's AUC 0.884).

What is done: per site, per-class offsets ``b_s`` (mean 0) such that the site's argmax decisions on the public
images fall into the classes in the proportions of the pooled released label counts
(:func:`~.class_prior.fit_decision_shares`; for two classes the quantile of the logit margin).  Adding an offset to
every logit changes no ranking, so each site keeps its AUC; the consensus then compares sites at one decision
point, where kappa measures whether they call the *same* images positive.  The offsets are folded into a copy of
the site's last linear layer's bias: the teacher (weights, inversion, the noise-adapted teacher, the KD targets)
uses the recalibrated copies, while every site's own reported metrics, FedAvg and the published equal-weight
teacher use the models the hospitals sent.

When: teacher weighting ``consensus`` and every site released ``label_counts`` (and they sum to more than 0).
Inputs are the public images and DP releases: post-processing, no privacy budget.  Without the counts there is no
target the server can defend: the equal teacher's own share or the sites' median share moved BreastMNIST teachers
by -0.192..+0.084 AUC on the same caches (measured, not adopted).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .class_prior import FOLD_TOLERANCE, decision_shares, fit_decision_shares, last_linear
from .site_models import SiteModel

__all__ = ["SiteCalibration", "decision_offsets", "recalibrated_sites", "check_fold"]


@dataclass
class SiteCalibration:
    """What recalibration did: the target class shares, each site's offsets and its decision shares before and after
    on the public images (or why nothing was changed)."""

    applied: bool
    target_shares: list[float]
    offsets: list[list[float]]
    shares_before: list[list[float]]
    shares_after: list[list[float]]
    reason: str = ""

    def record(self) -> dict[str, Any]:
        def rounded(rows: list[list[float]]) -> list[list[float]]:
            return [[round(v, 6) for v in row] for row in rows]
        out: dict[str, Any] = {"applied": self.applied, "target_shares": [round(v, 6) for v in self.target_shares],
                               "offsets": rounded(self.offsets), "decision_shares_before": rounded(self.shares_before),
                               "decision_shares_after": rounded(self.shares_after)}
        if self.reason:
            out["reason"] = self.reason
        return out


def _decision_shares(logits: Tensor) -> list[list[float]]:
    """``(S, N, K)`` -> each site's share of argmax decisions per class."""
    return [decision_shares(site).tolist() for site in logits]


def decision_offsets(per_site_logits: Tensor, shares: Tensor) -> Tensor:
    """``(S, N, K)`` site logits on public images and target class ``shares`` ``(K,)`` -> ``(S, K)`` offsets (float32)
    after which each site's decisions fall into the classes in those proportions (as nearly as ``N`` allows)."""
    logits = per_site_logits.detach().float().cpu()
    return torch.stack([fit_decision_shares(site, shares).float() for site in logits])


def recalibrated_sites(sites: list[SiteModel], per_site_logits: Tensor, shares: Tensor) -> tuple[list[SiteModel], Tensor, SiteCalibration]:
    """Copies of ``sites`` whose decision points are moved to ``shares`` on the public images.

    ``per_site_logits`` are the sites' ``(S, N, K)`` eval-mode logits on those images.  Returns the teacher's sites,
    their logits on the images after the move (``per_site_logits + offsets``, which the fold is checked against) and
    the record.  When some site's logits do not come straight from a final linear layer with a bias, nothing is
    changed: ``sites`` and ``per_site_logits`` come back as given, with the reason.
    """
    logits = per_site_logits.detach().float().cpu()
    target = shares.detach().double().clamp(min=0)
    target = target / target.sum()
    offsets = decision_offsets(logits, target)
    moved = logits + offsets[:, None, :]
    before = _decision_shares(logits)

    def unchanged(reason: str) -> tuple[list[SiteModel], Tensor, SiteCalibration]:
        return sites, logits, SiteCalibration(False, target.tolist(), offsets.tolist(), before, before, reason)

    copies = []
    for site, site_offsets in zip(sites, offsets):
        model = copy.deepcopy(site.model).eval()
        layer = last_linear(model, logits.shape[-1])
        if layer is None:
            return unchanged(f"{site.name}: no final linear layer with {logits.shape[-1]} outputs and a bias to fold the offsets into")
        with torch.no_grad():
            layer.bias.add_(site_offsets.to(layer.bias.dtype))
        copies.append(dataclasses.replace(site, model=model))
    return copies, moved, SiteCalibration(True, target.tolist(), offsets.tolist(), before, _decision_shares(moved))


def check_fold(calibration: SiteCalibration, expected: Tensor, measured: Tensor) -> SiteCalibration:
    """The fold is exact where the recalibrated copies' logits on the public images equal the expected ones."""
    gap = (measured.double() - expected.double()).abs().max().item()
    if gap > FOLD_TOLERANCE:
        return dataclasses.replace(calibration, applied=False, shares_after=calibration.shares_before,
                                   reason=f"the logits do not come straight from the last linear layer (moved {gap:.3g} off the offsets)")
    return calibration

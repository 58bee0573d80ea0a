"""How much each site's evidence for each class counts in the teacher: the weights of :class:`~.ensemble.Ensemble`.

Schemes (``--teacher-weighting``; the default is :func:`default_weighting`):

* ``equal``: no weights, the plain mean of logits (the method as published).
* ``label-counts``: ``w[s, c]`` proportional to site ``s``'s released count of
  class ``c`` (its ``label_counts`` artifact: DP-noised, so clamped at 0) plus a
  floor of one record.  A site that released no counts gets, per class, the mean
  count of the sites that did (an average share: neither trusted more nor
  dropped).  Needs at least one site with counts.
* ``agreement``: data-free, from the site models alone.  One class-balanced
  inversion batch is synthesised from the equal ensemble (at least
  ``PROBE_MIN_STEPS`` steps: a shorter inversion does not yet make the ensemble
  see the target classes, measured on the smoke preset's 12 steps).  Each
  site's decisions "is class c" on it are compared with the classes the batch
  was synthesised for by Cohen's kappa, the agreement beyond chance: a site
  that always, never or randomly says ``c`` scores 0 however the batch is
  balanced; one whose decisions follow the class evidence the ensemble put
  into the images scores 1.  ``w[s, c] = max(kappa, 0)``, no floor: a site's
  log-probability of a class it never predicts is very negative (-40 for
  logits (20, -20)), so even a 2 % share of it outweighs the sites that do
  follow the class; a class that no site follows gets equal weights
  (:func:`~.ensemble.normalise_weights`).  Not leave-one-out
  (comparing each site with the ensemble of the others): with two one-class
  sites among three, the others' ensemble of the good site is itself constant
  and every kappa is 0 (measured; see benchmarks/RESULTS.md).  What this does
  not catch: a site that follows synthetic class evidence but is wrong on real
  images.
* ``consensus``: for a server that holds public, unlabelled images of the
  modality (the ``proxy`` synthesis methods' ``--proxy-images``).  Each site's
  decisions on those real images are compared by Cohen's kappa with the
  teacher's own decisions on them, repeating with the new weights until they
  stop changing (at most ``CONSENSUS_MAX_ROUNDS``): a fixed point where every
  site is weighed by how well it agrees with the teacher it helps form.  The
  first teacher is weighted by each site's mean pairwise kappa with the other
  sites, not the equal one: one site with very large logits can make the equal
  teacher answer one class everywhere, and every kappa against a constant is
  0, which would leave the teacher equal (a test builds that case).  A constant site scores 0 as
  under ``agreement``; so does one that agrees on synthetic images but not on
  real ones, which ``agreement`` cannot see.  The images carry no labels and no
  site record, so this spends no privacy budget.  What it does not catch: a
  majority of sites that agree with each other and are wrong together (when
  that is because every hospital held one class, :mod:`~.class_evidence`
  refuses the run before any weighting).  Where
  every site released its label counts, the server first moves each site's
  decision point to the pooled counts' class shares on the public images
  (:mod:`~.site_calibration`, done by the caller on copies of the sites), so
  that a site that ranks well but decides one class everywhere is not scored 0.

The default is ``agreement`` (``equal`` for the ``paper`` preset, which is the
method as published, and for the ``smoke`` preset, see ``EQUAL_PRESETS``;
``consensus`` where the run has public images): it needs nothing beyond the site models, so it applies
to every run, and it is what keeps a one-class hospital from deciding the
teacher.  Measured on the DP demo's five hospitals (PneumoniaMNIST, epsilon 8,
seed 0; one hospital holds 14 records of one class): the equal teacher's
test ACC is 0.551 (balanced 0.64), the agreement teacher's 0.875 (0.861),
the label-counts teacher's 0.873 (0.858); the global model distilled from
them (cpu preset, 4 epochs) 0.378 / 0.752 / 0.833.  benchmarks/RESULTS.md has
the seeds.

What this module does not do: build ensembles (``Ensemble`` does) or read
artifacts (``study`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["WEIGHTINGS", "DEFAULT_WEIGHTING", "LABEL_COUNT_FLOOR", "PROBE_MIN_STEPS", "CONSENSUS_MAX_ROUNDS",
           "CONSENSUS_MAX_IMAGES", "default_weighting", "label_count_weights", "agreement_weights", "consensus_weights",
           "pairwise_agreement", "pooled_logits", "cohen_kappa"]

WEIGHTINGS = ("equal", "label-counts", "agreement", "consensus")
LABEL_COUNT_FLOOR = 1.0   # records: a class a site never saw still counts a little, and all-zero columns stay defined
PROBE_MIN_STEPS = 100     # inversion steps of the agreement batch (the cpu preset's)
CONSENSUS_MAX_ROUNDS = 20  # the fixed point was reached in 3-5 rounds on the DP studies' site models (measured)
CONSENSUS_MAX_IMAGES = 4096  # public images judged (a seeded draw from larger sets): kappa's error is ~1/sqrt(N)
DEFAULT_WEIGHTING = "agreement"
# Server presets whose teacher is the plain mean: "paper" is the method as published; "smoke" (a 12-step inversion,
# for checking that the pipeline runs) is too short for the agreement probe to see classes, which would cost it
# 100 steps (55 s instead of 20 s for the smoke demo's distillation, measured) for weights near equal anyway.
EQUAL_PRESETS = ("paper", "smoke")


def default_weighting(preset: str, public_images: bool = False) -> str:
    """The scheme a run gets when none is named: ``equal`` for the published method's and the smoke preset, else
    ``consensus`` where the run holds public images, else ``agreement``."""
    if preset in EQUAL_PRESETS:
        return "equal"
    return "consensus" if public_images else DEFAULT_WEIGHTING


def label_count_weights(counts: Sequence[Tensor | None], num_classes: int) -> Tensor:
    """``(S, K)`` weights from per-site released class counts (``None``: the site released none).

    Raises:
        ConfigError: no site released counts, or counts of the wrong shape or not finite.
    """
    rows: list[Tensor | None] = []
    for s, c in enumerate(counts):
        if c is None:
            rows.append(None)
            continue
        c = c.detach().float().cpu().reshape(-1)
        if c.numel() != num_classes or not torch.isfinite(c).all():
            raise ConfigError(f"site {s}: label counts must be {num_classes} finite numbers, got shape {tuple(c.shape)}")
        rows.append(c.clamp(min=0))
    known = [r for r in rows if r is not None]
    if not known:
        raise ConfigError("teacher weighting label-counts needs label counts from at least one site; none released any",
                          hint="use --teacher-weighting agreement or equal, or have the sites release label_counts")
    mean = torch.stack(known).mean(dim=0)
    return torch.stack([r if r is not None else mean for r in rows]) + LABEL_COUNT_FLOOR


def cohen_kappa(a: Tensor, b: Tensor) -> Tensor:
    """Cohen's kappa of two boolean decision vectors ``(N,)``; 0 when chance agreement is total (a constant pair)."""
    a, b = a.float(), b.float()
    observed = (a == b).float().mean()
    chance = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    return torch.where(chance < 1, (observed - chance) / (1 - chance).clamp(min=1e-12), torch.zeros(()))


def agreement_weights(per_site_logits: Tensor, targets: Tensor) -> Tensor:
    """``(S, N, K)`` unweighted site logits on a synthetic batch and its ``(N,)`` target classes -> ``(S, K)`` kappa weights."""
    logits = per_site_logits.detach().float().cpu()
    targets = targets.detach().cpu()
    sites, n, classes = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"{n} images but targets of shape {tuple(targets.shape)}")
    decisions = logits.argmax(dim=-1)                                  # (S, N)
    kappa = torch.stack([torch.stack([cohen_kappa(decisions[s] == c, targets == c) for c in range(classes)])
                         for s in range(sites)])
    return kappa.clamp(min=0)


def pooled_logits(per_site_logits: Tensor, weights: Tensor | None) -> Tensor:
    """``(S, N, K)`` site logits -> the teacher's ``(N, K)`` scores as :class:`~.ensemble.Ensemble` pools them:
    the mean of logits without weights, else the per-class weighted sum of log-probabilities."""
    from .ensemble import normalise_weights

    logits = per_site_logits.detach().float()
    if weights is None:
        return logits.mean(dim=0)
    w = normalise_weights(weights, logits.shape[0]).to(logits.device)
    return (torch.log_softmax(logits, dim=-1) * w[:, None, :]).sum(dim=0)


def consensus_weights(per_site_logits: Tensor, max_rounds: int = CONSENSUS_MAX_ROUNDS) -> Tensor:
    """``(S, N, K)`` site logits on public images -> ``(S, K)`` kappa weights against the teacher's own decisions.

    Starts from each site's mean pairwise kappa with the others; each round then weighs every site by its kappa
    against the current teacher's decisions, until the weights repeat (or ``max_rounds``: the last round's).
    """
    logits = per_site_logits.detach().float().cpu()
    weights = pairwise_agreement(logits)
    for _ in range(max_rounds):
        new = agreement_weights(logits, pooled_logits(logits, weights).argmax(dim=-1))
        if weights is not None and torch.allclose(new, weights, atol=1e-6):
            return new
        weights = new
    return weights


def pairwise_agreement(per_site_logits: Tensor) -> Tensor:
    """``(S, N, K)`` site logits -> ``(S, K)``: each site's mean kappa ("is class c") with every other site, at least 0."""
    decisions = per_site_logits.detach().float().cpu().argmax(dim=-1)     # (S, N)
    sites, classes = decisions.shape[0], per_site_logits.shape[-1]
    kappa = torch.zeros(sites, classes)
    for s in range(sites):
        for c in range(classes):
            others = [cohen_kappa(decisions[s] == c, decisions[t] == c) for t in range(sites) if t != s]
            kappa[s, c] = torch.stack(others).mean() if others else 1.0
    return kappa.clamp(min=0)

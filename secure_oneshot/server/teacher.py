"""The teacher of a distillation run: which site models form it, with which per-class weights, and where the
student's class prior is matched to.

:func:`teacher_weights` computes a :mod:`~.weighting` scheme's weights; :func:`teacher_sites_for` gives the sites
the teacher is built from (recalibrated copies under ``consensus`` with label counts, :mod:`~.site_calibration`);
:func:`prior_target` and :func:`match_prior` decide and apply the student's class prior (:mod:`~.class_prior`);
:func:`prior_options` is the inversion's prior (BN statistics and/or released feature statistics).

What this module does not do: run the distillation (:mod:`~.study` does) or load sites (:mod:`~.site_models`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .class_prior import LABEL_COUNTS, TEACHER, PriorMatch, match_class_prior, match_class_shares
from .ensemble import Ensemble, batching_for
from .execution import Execution
from .site_calibration import SiteCalibration, check_fold, recalibrated_sites
from .site_models import SiteModel, is_multi_label
from .synthesis import InversionConfig, synthesize_batch, tracks_running_stats
from .weighting import (CONSENSUS_MAX_IMAGES, PROBE_MIN_STEPS, agreement_weights, consensus_weights,
                        label_count_weights, pooled_logits)

__all__ = ["prior_options", "teacher_weights", "teacher_sites_for", "recalibrates", "prior_target", "pooled_label_counts",
           "match_prior", "site_logits"]


def prior_options(sites: list[SiteModel], student: nn.Module | None) -> dict[str, Any]:
    """The inversion prior: BN statistics and/or released feature statistics; BN-free sites without statistics get
    the adversarial student term (never CE alone; the trajectory grid, which has no student, is the one exception)."""
    stats = [s.feature_stats for s in sites]
    bn_free = not any(tracks_running_stats(m) for s in sites for m in s.model.modules())
    options: dict[str, Any] = {"feature_stats": stats if any(stats) else None}
    if bn_free and not any(stats):
        options.update(student=student, allow_ce_only=student is None)
    return options


def teacher_weights(sites: list[SiteModel], scheme: str, synth: InversionConfig, execution: Execution,
                    public: torch.Tensor | None = None) -> torch.Tensor | None:
    """The ``(S, K)`` teacher weights of ``scheme`` (:mod:`~secure_oneshot.server.weighting`); ``None`` for equal.

    ``agreement`` costs one inversion batch of ``synth`` (its batch size; at least ``PROBE_MIN_STEPS`` steps; seed
    shifted so that it is not the first epoch's batch) and one forward pass of every site over it.
    ``consensus`` costs one forward pass of every site over ``public`` (the server's public images as
    :func:`~.study.proxy_tensor` gives them; at most ``CONSENSUS_MAX_IMAGES``, a draw seeded by ``synth.seed``).  One site
    has nothing to be weighed against: ``None``.
    """
    if scheme == "equal" or len(sites) == 1:
        return None
    if is_multi_label(sites):
        raise ConfigError(f"teacher weighting {scheme!r} is per class; multi-label sites use the equal teacher",
                          hint="pass --teacher-weighting equal")
    if scheme == "label-counts":
        return label_count_weights([s.label_counts for s in sites], synth.num_classes)
    models = [s.model for s in sites]
    if scheme == "consensus":
        if public is None or len(public) == 0:
            raise ConfigError("teacher weighting 'consensus' needs public images", hint="pass --proxy-images")
        return consensus_weights(site_logits(models, _public_draw(public, synth.seed), execution))
    steps = max(synth.steps, PROBE_MIN_STEPS)
    probe = InversionConfig(**{**asdict(synth), "seed": synth.seed + 1_000_003, "steps": steps, "snapshot_every": steps})
    images, targets = synthesize_batch(models, None, probe, execution=execution, **prior_options(sites, student=None))
    return agreement_weights(site_logits(models, images, execution), targets)


def teacher_sites_for(sites: list[SiteModel], scheme: str, synth: InversionConfig, execution: Execution,
                      public: torch.Tensor | None, enabled: bool = True) -> tuple[list[SiteModel], SiteCalibration | None]:
    """The sites the teacher is built from: with ``consensus`` and every site's label counts released, copies whose
    decision points are moved to the pooled counts' class shares on the public images (:mod:`~.site_calibration`);
    else ``sites`` themselves.  ``public``: the server's public images as :func:`~.study.proxy_tensor` gives them;
    ``enabled``: the job's switch.  Deterministic (a resumed run recomputes the same copies)."""
    if not recalibrates(sites, scheme, synth, enabled) or public is None:
        return sites, None
    public = _public_draw(public, synth.seed)
    logits = site_logits([s.model for s in sites], public, execution)
    copies, expected, calibration = recalibrated_sites(sites, logits, pooled_label_counts(sites))
    if not calibration.applied:
        return sites, calibration
    calibration = check_fold(calibration, expected, site_logits([s.model for s in copies], public, execution))
    return (copies if calibration.applied else sites), calibration


def recalibrates(sites: list[SiteModel], scheme: str, synth: InversionConfig, enabled: bool = True) -> bool:
    """Whether the teacher's sites get their decision points moved: ``consensus``, single-label, more than one site,
    every site's label counts released and summing to more than 0, and not turned off by the job."""
    return (enabled and scheme == "consensus" and not synth.multi_label and len(sites) > 1
            and all(s.label_counts is not None for s in sites) and pooled_label_counts(sites).sum() > 0)


def _public_draw(public: torch.Tensor, seed: int) -> torch.Tensor:
    """At most ``CONSENSUS_MAX_IMAGES`` of the public images, a draw seeded by the run's seed (all of them when fewer)."""
    if len(public) <= CONSENSUS_MAX_IMAGES:
        return public
    draw = torch.Generator().manual_seed(seed + 2_000_003)
    return public[torch.randperm(len(public), generator=draw)[:CONSENSUS_MAX_IMAGES]]


def prior_target(sites: list[SiteModel], requested: str | None) -> str:
    """What the student's class prior is matched to (:mod:`~secure_oneshot.server.class_prior`): ``requested``, else
    the pooled label counts when every site released them, else the teacher."""
    missing = [s.name for s in sites if s.label_counts is None]
    usable = not missing and pooled_label_counts(sites).sum() > 0
    if requested == LABEL_COUNTS and not usable:
        raise ConfigError("prior matching to the label counts needs every site's label_counts artifact; missing: " + ", ".join(missing)
                          if missing else "prior matching to the label counts: the released counts sum to 0",
                          hint="match to the teacher instead (--prior-target teacher)")
    return requested or (LABEL_COUNTS if usable else TEACHER)


def pooled_label_counts(sites: list[SiteModel]) -> torch.Tensor:
    """The sites' released label counts summed (negative DP-noised counts count as 0), float64 ``(K,)``."""
    return torch.stack([s.label_counts.detach().double().cpu().reshape(-1).clamp(min=0) for s in sites]).sum(dim=0)


def match_prior(sites: list[SiteModel], student: nn.Module, public: torch.Tensor, weights: torch.Tensor | None,
                synth: InversionConfig, execution: Execution, target: str) -> PriorMatch:
    """:func:`~secure_oneshot.server.class_prior.match_class_prior` against the weighted teacher, or
    :func:`~secure_oneshot.server.class_prior.match_class_shares` against the pooled label counts, on the same
    public images ``consensus`` judges the sites on."""
    public = _public_draw(public, synth.seed)
    if target == LABEL_COUNTS:
        return match_class_shares(student, public, pooled_label_counts(sites))
    teacher = torch.softmax(pooled_logits(site_logits([s.model for s in sites], public, execution), weights), dim=-1)
    return match_class_prior(student, public, teacher)


def site_logits(models: list[nn.Module], images: torch.Tensor, execution: Execution, chunk: int = 512) -> torch.Tensor:
    """``(S, N, K)`` unweighted eval-mode logits of every site on ``images``, ``chunk`` images per pass."""
    execution = execution.for_models(models)
    ensemble = execution.prepare(Ensemble(models, batched=batching_for(execution.use_batched, models)))
    device = execution.torch_device
    parts = []
    with torch.no_grad(), execution.autocast():
        for start in range(0, len(images), chunk):
            parts.append(ensemble.per_site_logits(execution.layout(images[start:start + chunk].to(device))).float().cpu())
    return torch.cat(parts, dim=1)

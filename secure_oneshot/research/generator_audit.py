"""What a site's released diffusion generator reveals: membership inference and memorisation of its samples.

* **Membership** (loss threshold for diffusion models, as in Carlini et al.
  2023 and Matsumoto et al. 2023): each record's epsilon-prediction error,
  averaged over fixed timesteps and fixed noise (the same for every record,
  so records are compared on equal terms); a member should be denoised
  better.  Score = minus that error; :func:`~secure_oneshot.research.membership.attack_metrics`
  turns members' and non-members' scores into AUC, TPR at low FPR and an
  empirical epsilon lower bound.
* **LiRA, offline** (:func:`generator_lira`): the same statistic (its log,
  which is closer to Gaussian) under shadow generators trained the site's way
  on records that are not candidates, as for classifiers.
* **Memorisation**: class-balanced DDIM samples compared with the site's
  training images and unseen images (:mod:`~secure_oneshot.research.memorisation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, Dataset

from ..server.sources import SiteGenerator
from ..server.synthesis import balanced_labels
from .membership import AttackResult, attack_metrics, lira_offline
from .memorisation import closest_pairs_png, memorisation_report

__all__ = ["denoising_errors", "generator_membership", "generator_lira", "generator_memorisation"]

TIMESTEPS = (50, 200, 400)


@torch.no_grad()
def denoising_errors(generator: SiteGenerator, dataset: Dataset, *, timesteps: tuple[int, ...] = TIMESTEPS, seed: int = 0,
                     batch_size: int = 256) -> np.ndarray:
    """(N,) mean epsilon-prediction MSE of each record over ``timesteps`` with fixed noise."""
    from ..client.generator import _pad

    model = generator.model.eval()
    schedule = DDPMScheduler.from_config(generator.scheduler)
    size = generator.model.config.sample_size
    channels = generator.model.config.in_channels
    noise = torch.randn(len(timesteps), channels, size, size, generator=torch.Generator().manual_seed(seed))
    errors = []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x = _pad(x, generator.config)
        per_step = []
        for t, eps in zip(timesteps, noise):
            steps = torch.full((len(x),), t, dtype=torch.long)
            eps = eps.expand_as(x)
            predicted = model(schedule.add_noise(x, eps, steps), steps, class_labels=y).sample
            per_step.append(F.mse_loss(predicted, eps, reduction="none").mean(dim=(1, 2, 3)))
        errors.append(torch.stack(per_step).mean(0))
    return torch.cat(errors).numpy()


def generator_membership(generator: SiteGenerator, members: Dataset, non_members: Dataset, delta: float = 1e-5) -> AttackResult:
    return attack_metrics("generator denoising loss", -denoising_errors(generator, members), -denoising_errors(generator, non_members), delta)


def _log_denoising_score(generator: SiteGenerator, dataset: Dataset) -> np.ndarray:
    return -np.log(np.maximum(denoising_errors(generator, dataset), 1e-12))


def generator_lira(generator: SiteGenerator, shadows: list[SiteGenerator], members: Dataset, non_members: Dataset,
                   delta: float = 1e-5) -> AttackResult:
    """Offline LiRA on minus the log denoising error (module docstring)."""
    return lira_offline(generator, shadows, members, non_members, delta, statistic=_log_denoising_score, name="generator LiRA offline")


def generator_memorisation(generator: SiteGenerator, train_images: torch.Tensor, unseen_images: torch.Tensor, *, samples: int = 64,
                           num_classes: int = 2, steps: int = 25, seed: int = 0, pairs_png: str | None = None) -> dict[str, Any]:
    """Near-copy statistics of ``samples`` class-balanced samples; with ``pairs_png``, their closest pairs as a PNG."""
    from ..client.generator import sample_images

    images = sample_images(generator.model, generator.scheduler, balanced_labels(samples, num_classes), steps=steps, seed=seed)
    report = memorisation_report(images, train_images, unseen_images)
    if pairs_png:
        closest_pairs_png(report, images, train_images, pairs_png)
    return report.to_json()

"""A DP decision threshold for a binary site model: undo the majority bias that DP-SGD leaves in the logits.

Why: per-sample clipping lets the many low-loss majority records outvote the
clipped minority ones, so a DP model's logit margin ``m = z_1 - z_0`` is shifted
towards the majority by an amount that depends on the site's skew, size,
training length and noise -- a fixed logit adjustment (``tau``) fits some sites
and overshoots on others.  Here the shift is *measured*: the site releases,
with its own DP noise, where its own training records fall on the margin axis,
and the model's output bias is moved to the margin that maximises balanced
accuracy on that noisy picture.

Mechanism (Gaussian, add/remove-one neighbouring datasets): a histogram of the
trained model's margins on the site's training records, one row per true class,
over :data:`EDGES` (fixed, data-independent bin edges; margins beyond them land
in the end bins).  One record changes exactly one cell by 1: L2 sensitivity 1,
so it is one Gaussian step with sample rate 1 -- the same accounting as the DP
label histogram (:mod:`.label_counts`), calibrated and verified the same way.
The histogram itself never leaves the site; the threshold chosen from it and the
bias shift are post-processing, and the classifier's DP record gains this step
so that its epsilon covers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..policy.dp import DpRecord
from .label_counts import calibrate_sigma, with_gaussian_steps

__all__ = ["EDGES", "ThresholdRelease", "margins", "noisy_margin_histogram", "balanced_threshold", "shift_decision",
           "with_threshold_release"]

_HALF = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0])
EDGES = np.concatenate([-_HALF[::-1], [0.0], _HALF])
"""Bin edges of the margin histogram (logits), fixed in advance (choosing them from the data would leak): half a
logit apart near 0, wider further out, where a DP model trained long with large batches puts whole classes
(margins of 6-10 logits were seen); beyond +-20 the two open end bins."""


@dataclass(frozen=True)
class ThresholdRelease:
    threshold: float            # the margin moved to 0 (logits); positive: the model favoured class 1
    noise_multiplier: float
    epsilon: float


def margins(model: nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """``z_1 - z_0`` of ``model`` on ``images`` (eval mode, no gradients)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            z = model(images[start:start + batch]).float()
            out.append((z[:, 1] - z[:, 0]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def noisy_margin_histogram(values: np.ndarray, labels: np.ndarray, sigma: float,
                           rng: np.random.Generator | None = None) -> np.ndarray:
    """``(2, len(EDGES) + 1)`` counts of records per (true class, margin bin), plus ``N(0, sigma^2)`` in every cell.

    Noise comes from OS entropy unless ``rng`` is given (tests): a known seed would let anyone subtract it.
    """
    bins = np.searchsorted(EDGES, values, side="right")            # 0 .. len(EDGES): open ends included
    counts = np.zeros((2, len(EDGES) + 1))
    np.add.at(counts, (labels.astype(np.int64), bins), 1.0)
    generator = rng if rng is not None else np.random.default_rng()
    return counts + generator.normal(0.0, sigma, size=counts.shape)


def balanced_threshold(histogram: np.ndarray) -> float:
    """The bin edge whose decision ``margin > edge`` maximises balanced accuracy on the (noisy) histogram.

    Noisy cells are clamped at 0 (post-processing).  Ties go to the edge nearest 0, i.e. the smallest shift.
    """
    h = np.clip(histogram, 0.0, None)
    n0, n1 = max(h[0].sum(), 1.0), max(h[1].sum(), 1.0)
    # cutting after bin j (edge EDGES[j]) predicts class 0 for bins 0..j, class 1 for the rest
    tnr = np.cumsum(h[0])[:-1] / n0
    tpr = (n1 - np.cumsum(h[1])[:-1]) / n1
    score = tnr + tpr
    best = np.flatnonzero(np.isclose(score, score.max()))
    return float(EDGES[best[np.argmin(np.abs(EDGES[best]))]])


def _output_layer(model: nn.Module) -> nn.Linear:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers or layers[-1].out_features != 2 or layers[-1].bias is None:
        raise ConfigError("the DP decision threshold needs a binary classifier ending in a linear layer with a bias")
    return layers[-1]


def shift_decision(model: nn.Module, threshold: float) -> None:
    """Move the margin ``threshold`` to 0: ``z_1 - z_0`` becomes ``z_1 - z_0 - threshold`` (output bias only)."""
    layer = _output_layer(model)
    with torch.no_grad():
        layer.bias[1] -= threshold / 2
        layer.bias[0] += threshold / 2


def calibrate_threshold(model: nn.Module, images: torch.Tensor, labels: np.ndarray, epsilon: float, delta: float,
                        rng: np.random.Generator | None = None) -> ThresholdRelease:
    """Measure the DP threshold on the site's training records and shift ``model``'s output bias by it (in place)."""
    _output_layer(model)
    sigma = calibrate_sigma(epsilon, delta)
    threshold = balanced_threshold(noisy_margin_histogram(margins(model, images), labels, sigma, rng))
    shift_decision(model, threshold)
    return ThresholdRelease(threshold, sigma, epsilon)


def with_threshold_release(record: DpRecord, release: ThresholdRelease) -> DpRecord:
    """The classifier's record with the margin histogram's Gaussian step appended (its epsilon recomputed)."""
    return with_gaussian_steps(record, ((release.noise_multiplier, 1.0, 1),))

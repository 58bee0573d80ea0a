"""A DP label histogram (artifact ``label_counts``) and the logit-adjusted loss that uses it.

Mechanism (Gaussian, add/remove-one neighbouring datasets)
----------------------------------------------------------
The release is ``counts~[k] = n_k + N(0, sigma**2)`` for every class ``k``, one
independent draw per class.  Adding or removing one record changes exactly
one count by 1, so the L2 sensitivity is 1 and this is the Gaussian mechanism
with noise multiplier ``sigma`` -- exactly one DP-SGD step with sample rate 1
and clipping norm 1.  The DP record therefore has history
``((sigma, 1.0, 1),)`` and ``max_grad_norm = 1``; the same Opacus accountants
that check the classifier's record recompute its epsilon, and the policy layer
composes it with every other release over the same records
(``dataset_fingerprint``).  ``sigma`` is calibrated for ``(epsilon, delta)``
with Opacus's ``get_noise_multiplier(sample_rate=1, steps=1)`` and checked with
the verifier's pinned settings (:func:`~secure_oneshot.policy.dp.compute_epsilon`).

The accountant is always PRV: for one Gaussian release the RDP conversion
cannot certify the small epsilons this artifact is meant for (0.1 and below).
Sampling label: every record is counted once, so the record says
``sampling = "fixed"`` (as for DP feature statistics); policies set
``require_poisson = false`` for this artifact.

The released counts are noisy: they may be fractional or negative.  Whoever
uses them clamps (:func:`log_prior` clamps each count to at least 1).

Noise comes from OS entropy unless a generator is passed (tests): a fixed,
known seed would let anyone regenerate the noise and subtract it.

Logit adjustment (Menon et al., 2021)
-------------------------------------
:class:`LogitAdjustedLoss` trains with cross-entropy on ``logits + tau *
log(prior)``; the model's own logits (used for evaluation and by the server)
are not adjusted, which is what makes its predictions balanced across classes
instead of favouring the majority.  When the prior comes from the released
histogram, the loss is post-processing of a DP release.  Training code that
uses it adds the histogram's step to the classifier's DP record
(:func:`with_label_release`), so the classifier's epsilon holds even when the
histogram itself is not exported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, PrivacyError
from ..policy.dp import DpRecord, compute_epsilon

__all__ = ["ACCOUNTANT", "SAMPLING", "LabelRelease", "calibrate_sigma", "noisy_label_counts", "log_prior", "LogitAdjustedLoss",
           "with_label_release", "with_gaussian_steps"]

ACCOUNTANT = "prv"
SAMPLING = "fixed"
_SIGMA_BUMPS = 50   # at most +64% over Opacus's search before giving up (never reached in practice)


@dataclass(frozen=True)
class LabelRelease:
    """The released histogram (float32, ``(num_classes,)``) and its DP record."""

    counts: torch.Tensor
    record: DpRecord


def _quiet_epsilon(sigma: float, delta: float) -> float:
    import warnings

    with warnings.catch_warnings():   # PRV warns about its own discretisation; the verifier uses the same settings
        warnings.simplefilter("ignore")
        return compute_epsilon(ACCOUNTANT, ((sigma, 1.0, 1),), delta)


def calibrate_sigma(epsilon: float, delta: float) -> float:
    """Noise multiplier of one Gaussian release (sample rate 1, one step) spending at most ``epsilon`` at ``delta``.

    Raises:
        ConfigError: ``epsilon`` or ``delta`` out of range.
        PrivacyError: the accountant cannot certify this budget.
    """
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    if not (math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
        raise ConfigError(f"label counts need 0 < epsilon and 0 < delta < 1 (got epsilon {epsilon:g}, delta {delta:g})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1,
                                               accountant=ACCOUNTANT))
    except (ValueError, RuntimeError, ArithmeticError) as e:
        raise PrivacyError(f"cannot calibrate label-count noise for epsilon {epsilon:g} at delta {delta:g}: {e}",
                           hint="choose an epsilon between 0.01 and 10") from e
    for _ in range(_SIGMA_BUMPS):
        if _quiet_epsilon(sigma, delta) <= epsilon:
            return sigma
        sigma *= 1.01
    raise PrivacyError(f"the pinned PRV accountant does not confirm epsilon {epsilon:g} near sigma {sigma:g}",
                       hint="choose an epsilon between 0.01 and 10")


def _versions() -> dict[str, str]:
    import opacus
    import scipy

    return {"opacus": str(opacus.__version__), "torch": str(torch.__version__), "numpy": str(np.__version__),
            "scipy": str(scipy.__version__)}


def noisy_label_counts(labels: Sequence[int] | np.ndarray, num_classes: int, epsilon: float, delta: float, *,
                       dataset_fingerprint: str, rng: np.random.Generator | None = None) -> LabelRelease:
    """Release the class histogram of ``labels`` with ``(epsilon, delta)``-DP (Gaussian mechanism, sensitivity 1).

    Args:
        labels: one integer label per record, in ``[0, num_classes)``.
        num_classes: length of the histogram (the classifier's classes, public).
        epsilon, delta: the budget of this release.
        dataset_fingerprint: identifies the records (composition with the classifier's budget).
        rng: noise source; ``None`` (the default outside tests) draws from OS entropy.

    Returns:
        The noisy counts (float32, may be negative or fractional) and the record ``verify_claim`` accepts.

    Raises:
        ConfigError: a label outside ``[0, num_classes)`` or a bad budget.
        PrivacyError: the budget cannot be certified.
    """
    values = np.asarray(labels, dtype=np.int64).reshape(-1)
    if num_classes < 1 or (values.size and (values.min() < 0 or values.max() >= num_classes)):
        raise ConfigError(f"labels must lie in [0, {num_classes})")
    sigma = calibrate_sigma(epsilon, delta)
    exact = np.bincount(values, minlength=num_classes).astype(np.float64)
    generator = rng if rng is not None else np.random.default_rng()   # default_rng() seeds from OS entropy
    noisy = exact + generator.normal(0.0, sigma, size=num_classes)
    history = ((sigma, 1.0, 1),)
    record = DpRecord(ACCOUNTANT, history, delta, _quiet_epsilon(sigma, delta), 1.0, SAMPLING, dataset_fingerprint,
                      _versions())
    return LabelRelease(torch.from_numpy(noisy.astype(np.float32)), record)


def log_prior(counts: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``log`` of the class prior from (noisy) counts: each clamped to at least 1, then normalised."""
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64)).clamp(min=1.0)
    return (c / c.sum()).log().to(torch.float32)


class LogitAdjustedLoss(nn.CrossEntropyLoss):
    """Cross-entropy on ``logits + tau * log_prior`` (training only; evaluation uses the plain logits).

    A subclass of ``CrossEntropyLoss`` so that its ``reduction`` attribute works as Opacus's
    ghost clipping expects (it switches it to ``"none"`` for per-sample losses).
    """

    def __init__(self, log_prior: torch.Tensor, tau: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("offset", tau * log_prior.detach().to(torch.float32).reshape(1, -1))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits + self.offset.to(logits.dtype), target)


def with_gaussian_steps(record: DpRecord, steps: tuple[tuple[float, float, int], ...]) -> DpRecord:
    """``record`` with further accountant steps appended and its epsilon recomputed over the joint history."""
    history = tuple(record.history) + tuple(steps)
    return DpRecord(record.accountant, history, record.delta, compute_epsilon(record.accountant, history, record.delta),
                    record.max_grad_norm, record.sampling, record.dataset_fingerprint, dict(record.versions))


def with_label_release(record: DpRecord, release: LabelRelease) -> DpRecord:
    """The classifier's record with the histogram's Gaussian step appended to its history.

    A classifier trained with a prior from the histogram is a function of the DP-SGD transcript *and* the
    histogram, so its own guarantee composes both; the record's epsilon is recomputed over the joint history.
    """
    return with_gaussian_steps(record, tuple(release.record.history))

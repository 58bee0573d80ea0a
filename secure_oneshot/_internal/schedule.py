"""The step learning-rate schedule of the method's public code, shared by site training and distillation.

The published loops count epochs from 1 and set the rate at the start of each
epoch: ``lr`` while ``epoch < 50``, ``lr * 0.1`` while ``epoch < 75``, else
``lr * 0.01`` (100 epochs).  So, counted from 1, epochs 1-49 run at ``lr``,
50-74 at ``lr / 10`` and 75-100 at ``lr / 100``: the drop happens *at* epoch 50,
not after it.  Here a milestone is a fraction ``m`` of the epochs; the
1-based milestone epoch is ``round(m * epochs)``, and every epoch from it on
runs at the lower rate.  Callers count epochs from 0, so 0-based epoch ``e``
has dropped once it satisfies ``e + 1 >= round(m * epochs)``.

This module imports nothing heavy: it is plain arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["milestone_epochs", "rate_factor"]


def milestone_epochs(milestones: Sequence[float], epochs: int) -> list[int]:
    """The 1-based epochs at which the rate drops (``[50, 75]`` for ``(0.5, 0.75)`` of 100); never before epoch 2,
    so that a short run (2 epochs, say) still starts at the base rate."""
    return sorted(max(2, round(m * epochs)) for m in milestones)


def rate_factor(epoch: int, epochs: int, milestones: Sequence[float], gamma: float = 0.1) -> float:
    """The multiplier of the base rate for 0-based ``epoch``: ``gamma`` per milestone epoch reached."""
    return gamma ** sum(epoch + 1 >= m for m in milestone_epochs(milestones, epochs))

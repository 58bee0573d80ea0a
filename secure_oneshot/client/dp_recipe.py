"""Pieces of a DP-SGD recipe tuned for privacy: augmentation multiplicity and a weight average.

*Augmentation multiplicity* (De et al. 2022, section 3.3): each record of a
logical batch is seen as ``k`` randomly augmented views; the per-sample
gradients of the views are **averaged per record before clipping**, so one
record still contributes one clipped gradient of norm at most ``C`` and the
sample rate, noise and steps, hence the epsilon, are those of plain DP-SGD.
Clipping each view separately would let one record contribute ``k`` clipped
gradients (sensitivity ``k*C``): :func:`average_view_grad_samples` is what
prevents that, and a test fails if it is skipped.

The *exponential moving average* of the weights (De et al.; Sander et al.
2023) is post-processing of the DP iterates: it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["augment_views", "average_view_grad_samples", "WeightAverage"]

CROP_PADDING = 2
"""Random translation by up to this many pixels (reflect padding, then a crop back to size): small next to
a 28 px image, where a 4 px shift (CIFAR's usual) moves an organ edge out of view."""


def augment_views(images: torch.Tensor, views: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``views`` random augmentations of each image, record-major: rows ``i*views .. i*views+views-1`` are image ``i``.

    Each view is a random translation (reflect padding by :data:`CROP_PADDING`, random crop) and a random
    horizontal flip.  With ``views == 1`` the images are returned unchanged.
    """
    if views <= 1:
        return images
    n, c, h, w = images.shape
    x = images.repeat_interleave(views, dim=0)
    if x.shape[0] == 0:
        return x
    p = CROP_PADDING
    padded = nn.functional.pad(x, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])                       # (N*views, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])                       # (N*views, w)
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(x.shape[0])[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] for every view b, then back to (N*views, c, h, w)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def average_view_grad_samples(params: Iterable[nn.Parameter], views: int) -> None:
    """Replace the per-sample gradients of the last backward pass, one row per view, by their mean per record.

    Opacus stores a parameter's per-sample gradients in ``p.grad_sample``: one tensor after one backward
    pass, a list of tensors (one per physical batch) when BatchMemoryManager accumulates a logical batch.
    Only the newest entry comes from the pass that saw the views; earlier entries were averaged already.
    """
    if views <= 1:
        return
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is None:
            continue
        latest = grad_sample[-1] if isinstance(grad_sample, list) else grad_sample
        if latest.shape[0] % views:
            raise RuntimeError(f"{latest.shape[0]} per-sample gradients are not {views} views of whole records")
        averaged = latest.reshape(latest.shape[0] // views, views, *latest.shape[1:]).mean(dim=1)
        if isinstance(grad_sample, list):
            grad_sample[-1] = averaged
        else:
            p.grad_sample = averaged


class WeightAverage:
    """An exponential moving average of a model's parameters and buffers, with the usual warm-up.

    The decay at update ``t`` is ``min(decay, (1 + t) / (10 + t))`` so that a short DP run (tens of steps)
    is not dominated by the random initialisation.  ``decay == 0`` turns it off (the model itself is kept).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("the weight average's decay must be in [0, 1)")
        self.decay = decay
        self.updates = 0
        self.average: nn.Module | None = None
        if decay > 0:
            from torch.optim.swa_utils import AveragedModel

            self.average = AveragedModel(model, avg_fn=self._blend, use_buffers=True)

    def _blend(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        t = int(num_averaged)
        d = min(self.decay, (1.0 + t) / (10.0 + t))
        return d * averaged + (1.0 - d) * current

    def update(self, model: nn.Module) -> None:
        if self.average is not None:
            self.average.update_parameters(model)
            self.updates += 1

    def model(self, fallback: nn.Module) -> nn.Module:
        """The averaged model (a plain module), or ``fallback`` when averaging is off or never updated."""
        if self.average is None or self.updates == 0:
            return fallback
        return self.average.module

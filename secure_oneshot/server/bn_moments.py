"""Per-channel batch moments of a normalisation layer's input, with one-pass gradients.

The inversion's statistics loss (:class:`~secure_oneshot.server.synthesis.BNStatHooks`)
needs, at every matched layer of every site and every step, the mean and the
biased variance of the layer's input over samples and positions, and their
gradient.  At 28 px the first layer's input is 64 x 32 x 28 x 28 floats
(6.4 MB): larger than a core's L2 cache, so each pass over it goes to memory,
and the number of passes, not the arithmetic, sets the cost.

:func:`batch_moments` computes ``E[x]`` and ``E[x^2] - E[x]^2`` (two reductions
of the same input, no centred copy), whose gradient is one ``addcmul``
(:class:`_RawMoments`) instead of autograd's chain of broadcasts and products.
It gives the values and gradients of the plain code to float rounding
(``tests/test_fused_paths.py``) and runs inside ``vmap`` (the batched
ensemble's hooks).  In float32 ``E[x^2] - E[x]^2`` costs a relative error of
about ``eps * (mean / std)^2`` in the variance: 1e-7 for layer inputs whose
mean is a few standard deviations, far below what the loss can see.

Measured and not adopted: an eval-mode BatchNorm layer's output and its input's
moments as one autograd Function (one backward pass for both): 2-4 % less CPU
per small-cnn epoch, 5 % more with ResNet-18 sites, whose many small BatchNorm
layers pay the Function's per-call overhead (``benchmarks/RESULTS.md``).

What this module does not do: decide which layers are matched, or hold targets.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_moments"]


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over samples and positions: ``(N, C, *) -> (C,), (C,)``.

    Measured on one CPU thread, (64, 32, 28, 28) forward + backward: 8-11 ms as ``E[x^2] - E[x]^2``
    under autograd against 34 ms for ``mean`` + ``var`` (``torch.var_mean``: 21 ms), and 3.0 ms against
    8.4 ms (channels_last) with the closed-form gradient.  A channels_last input is reduced as its
    ``(N*H*W, C)`` view.
    """
    x = x.float()  # under bf16 autocast the layer input is bf16: its moments are not
    if x.dim() == 4 and _channels_last(x):
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])   # a view: channels are the contiguous dimension
        mean, square = _RawMoments.apply(rows, (0,))
    else:
        mean, square = _RawMoments.apply(x, (0, *range(2, x.dim())))
    return mean, (square - mean * mean).clamp_min(0)


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is stored channels_last (False inside ``vmap``, which cannot tell: the plain reduction runs)."""
    try:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    except RuntimeError:
        return False


class _RawMoments(torch.autograd.Function):
    """``(E[x], E[x^2])`` over ``dims``, with the input's gradient in one pass: ``g_mean / n + (2 / n) g_square x``.

    Autograd of ``x.mean()`` and ``(x * x).mean()`` materialises both broadcast gradients, multiplies
    each operand of the product by its gradient and sums the three, each a pass over a tensor of the
    input's size; the closed form is one ``addcmul``.  ``generate_vmap_rule``: the batched ensemble runs
    its hooks inside ``vmap``.  An unused moment's gradient arrives as zeros (autograd materialises it).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return x.mean(dim=dims), (x * x).mean(dim=dims)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, tuple[int, ...]], output: Any) -> None:
        x, dims = inputs
        ctx.save_for_backward(x)
        ctx.dims = dims

    @staticmethod
    def backward(ctx: Any, g_mean: Tensor, g_square: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        kept = [1 if d in ctx.dims else size for d, size in enumerate(x.shape)]   # broadcast the (C,) gradients
        n = math.prod(x.shape[d] for d in ctx.dims)
        return torch.addcmul(g_mean.reshape(kept) / n, x, g_square.reshape(kept) * (2.0 / n)), None

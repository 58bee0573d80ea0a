"""Memorisation of synthetic images: is any image the server synthesises (or a generator samples) a near-copy
of a site's training image?

For every synthetic image ``s``: ``d_train(s)``, the distance to its nearest
training image, and ``d_test(s)``, to its nearest image of a held-out set from
the same distribution (the MedMNIST test split).  Distance: root-mean-square
pixel difference on the [-1, 1] scale (0 = identical, about 1.15 between two
independent uniform-noise images).  ``s`` is flagged a **near-copy** when

    d_train(s) < copy_distance (0.05 by default: under 2.5% of the pixel range on average), and
    d_train(s) / d_test(s) < ratio (0.5 by default: much closer to a training image than to any unseen one),

the second condition so that a merely typical image (equally close to train
and test) is not flagged.  The closest pairs are written as a PNG so a person
can judge (:func:`closest_pairs_png`).

The reported **median ratio** compares reference sets of the same size: the
larger of the two is subsampled (fixed seed) to the smaller's size, because
the nearest of 4,708 images is closer than the nearest of 624 by count alone
(measured: realistic synthetic images gave 0.90 against the full PneumoniaMNIST
train split and the test split, about 1 against equal-size sets).  Flagging
uses the full training set, so no planted copy can be missed.

What this module does not do: generate the images or decide what is acceptable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MemorisationReport", "nearest_distances", "memorisation_report", "closest_pairs_png"]


@dataclass(frozen=True)
class MemorisationReport:
    images: int
    near_copies: int
    fraction: float
    median_train_distance: float
    median_ratio: float
    copy_distance: float
    ratio: float
    closest: list[tuple[int, int, float]]   # (synthetic index, training index, distance), closest first

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def nearest_distances(queries: Tensor, references: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """RMS pixel distance from each query to its nearest reference, and that reference's index.

    ``queries (Q, C, H, W)``, ``references (R, C, H, W)``, same shape per image; chunked so memory stays
    ``chunk x R`` floats.
    """
    q = queries.reshape(len(queries), -1).double()
    r = references.reshape(len(references), -1).double()
    dims = q.shape[1]
    best, index = [], []
    for part in q.split(chunk):
        d2 = torch.cdist(part, r).square() / dims
        value, where = d2.min(dim=1)
        best.append(value.clamp_min(0).sqrt())
        index.append(where)
    return torch.cat(best).float(), torch.cat(index)


def memorisation_report(synthetic: Tensor, train: Tensor, held_out: Tensor, *, copy_distance: float = 0.05,
                        ratio: float = 0.5, top: int = 8) -> MemorisationReport:
    """Near-copy statistics of ``synthetic`` against ``train`` (module docstring for the rule)."""
    d_train, nearest = nearest_distances(synthetic, train)
    d_test, _ = nearest_distances(synthetic, held_out)
    flagged = (d_train < copy_distance) & (d_train / d_test.clamp_min(1e-12) < ratio)
    size = min(len(train), len(held_out))
    d_train_equal = d_train if len(train) == size else nearest_distances(synthetic, _subsample(train, size))[0]
    d_test_equal = d_test if len(held_out) == size else nearest_distances(synthetic, _subsample(held_out, size))[0]
    order = torch.argsort(d_train)[:top]
    closest = [(int(i), int(nearest[i]), float(d_train[i])) for i in order]
    return MemorisationReport(len(synthetic), int(flagged.sum()), float(flagged.float().mean()), float(d_train.median()),
                              float((d_train_equal / d_test_equal.clamp_min(1e-12)).median()), copy_distance, ratio, closest)


def _subsample(images: Tensor, size: int) -> Tensor:
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:size]]


def closest_pairs_png(report: MemorisationReport, synthetic: Tensor, train: Tensor, path: str | os.PathLike[str]) -> None:
    """Two rows: the closest synthetic images (top) and their nearest training images (bottom), atomically."""
    from ..client.generator import save_sample_grid

    top = torch.stack([synthetic[i] for i, _, _ in report.closest])
    bottom = torch.stack([train[j] for _, j, _ in report.closest])
    save_sample_grid(torch.cat([top, bottom]).float(), path, nrow=len(report.closest))

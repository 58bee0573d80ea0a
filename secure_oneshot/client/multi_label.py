"""Multi-label site training (labels ``(N, L)`` 0/1, e.g. ChestMNIST): the loss, and what does not apply to it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.medmnist_data import is_multi_label
from ..errors import ConfigError

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["MultiLabelBCE", "check_multi_label"]


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy with logits, one decision per label, averaged over labels (labels ``(N, L)`` 0/1).

    ``reduction`` is read at call time: Opacus's ghost clipping sets it to ``"none"`` and needs one loss per record.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_record = nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").mean(dim=1)
        return per_record if self.reduction == "none" else per_record.sum() if self.reduction == "sum" else per_record.mean()


def check_multi_label(cfg: TrainConfig, task: str) -> None:
    """Multi-label sites train with BCE; the releases and losses built on one class per record do not apply."""
    if not is_multi_label(task):
        return
    unsupported = [name for name, value in (("label_counts_epsilon", cfg.label_counts_epsilon), ("threshold_epsilon", cfg.threshold_epsilon),
                                            ("loss = \"logit-adjusted\"", cfg.loss == "logit-adjusted")) if value]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)} apply to one class per record; this is a multi-label task",
                          hint="remove them: multi-label sites train with binary cross-entropy per label")

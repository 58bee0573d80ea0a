"""Which epoch's weights a site hands over: the last epoch's, or the best one on the site's own validation slice.

``TrainConfig.checkpoint``:

* ``"last"``: the weights after the last epoch.
* ``"best-val"``: the weights of the epoch with the highest accuracy on the
  site's validation slice (a held-out part of its own records; the test split
  is never looked at), as the method's public code hands its server the
  ``best.pth`` of each site.  Ties keep the earlier epoch (the published loop
  saves only on a strict improvement); a NaN accuracy never counts as one.

Under DP ``"best-val"`` is refused, not accounted: choosing among the epochs by
their accuracy on private records is a selection on private data, which the
DP-SGD guarantee does not cover (it would need its own DP selection mechanism
and budget).  A DP site hands over its last epoch.

The chosen epoch is recorded (:attr:`CheckpointChooser.record`) so that the
training record says what was handed over.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["CHECKPOINTS", "CheckpointChooser"]

CHECKPOINTS = ("last", "best-val")


class CheckpointChooser:
    """Keeps a CPU copy of the best epoch's weights (``best-val``); with ``last`` it only records.

    Raises:
        ConfigError: an unknown choice, or ``best-val`` under DP.
    """

    def __init__(self, choice: str, dp: bool) -> None:
        if choice not in CHECKPOINTS:
            raise ConfigError(f"unknown checkpoint choice {choice!r}", hint=f"set checkpoint to one of {', '.join(CHECKPOINTS)}")
        if choice == "best-val" and dp:
            raise ConfigError("checkpoint \"best-val\" selects an epoch on private records, which DP-SGD does not account for",
                              hint="set checkpoint = \"last\" in [train] for DP training")
        self.choice = choice
        self.epoch = 0
        self.val_acc = -math.inf
        self._state: dict[str, torch.Tensor] | None = None

    def observe(self, epoch: int, val_acc: float, model: nn.Module) -> None:
        """After 1-based ``epoch``: its validation accuracy, and the model that was validated."""
        if self.choice == "last":
            self.epoch, self.val_acc = epoch, val_acc
            return
        if not math.isnan(val_acc) and val_acc > self.val_acc:
            self.epoch, self.val_acc = epoch, val_acc
            self._state = {k: v.detach().cpu().clone() for k, v in _inner(model).state_dict().items()}

    def choose(self, model: nn.Module) -> nn.Module:
        """``model`` (the last epoch's, as it would be handed over) with the chosen epoch's weights."""
        if self._state is not None:
            _inner(model).load_state_dict(self._state)
        return model

    @property
    def record(self) -> dict[str, Any]:
        """For the training record: the choice, the 1-based epoch handed over, and its validation accuracy."""
        return {"choice": self.choice, "epoch": self.epoch,
                "val_acc": None if not math.isfinite(self.val_acc) else round(float(self.val_acc), 6),
                "selected_on": "the site's validation slice" if self.choice == "best-val" else "nothing (last epoch)"}


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)

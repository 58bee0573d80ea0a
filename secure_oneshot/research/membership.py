"""Membership inference against a released classifier: how much does it reveal about who trained it?

Two attacks, both scoring every candidate record (higher = "was a member"):

* **loss threshold** (Yeom et al. 2018): score = minus the model's
  cross-entropy loss on the record;
* **LiRA, offline variant** (Carlini et al. 2022, section "offline"): ``K``
  shadow models are trained the same way on records drawn from the site's
  population that exclude every candidate (all "OUT"); for each candidate the
  shadow models' logit-scaled confidences ``phi = log p_y - log(1 - p_y)`` give a
  Gaussian (mean per record, one global standard deviation, as the paper
  advises for few shadows); the score is ``Phi((phi_target - mu) / sigma)``,
  the one-sided test that the target is more confident than an OUT model.

Reported (:func:`attack_metrics`): ROC AUC, TPR at 1% and 0.1% FPR, and an
**empirical epsilon lower bound** (Jagielski et al. 2020): the largest, over
the ROC's thresholds, of ``log((TPR - delta) / FPR)``, with Clopper-Pearson
bounds on both rates in the direction that makes the bound smaller and a
Bonferroni correction over the thresholds tried, so it holds with 95% confidence;
it is a lower bound on the true epsilon, to be read next to the accountant's
upper bound.  With a few hundred candidates it cannot exceed about
``log(n)``: small audits can only refute large leaks.

What this module does not do: choose the candidates (the caller passes
members the model trained on and non-members it never saw, from the same
distribution) or train the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, norm
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["AttackResult", "attack_metrics", "empirical_epsilon", "loss_attack", "lira_offline", "true_class_logits"]


@dataclass(frozen=True)
class AttackResult:
    name: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    epsilon_lower_bound: float
    members: int
    non_members: int

    def to_json(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


@torch.no_grad()
def _outputs(model: nn.Module, dataset: Dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, K) float64, labels (N,)) in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits.append(model(x).double())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def true_class_logits(model: nn.Module, dataset: Dataset) -> np.ndarray:
    """LiRA's ``phi = log p_y - log(1 - p_y)`` per record, computed stably from log-softmax."""
    logits, labels = _outputs(model, dataset)
    log_p = F.log_softmax(logits, dim=1)
    log_py = log_p.gather(1, labels[:, None]).squeeze(1)
    others = log_p.clone()
    others.scatter_(1, labels[:, None], -math.inf)
    return (log_py - torch.logsumexp(others, dim=1)).numpy()


def _losses(model: nn.Module, dataset: Dataset) -> np.ndarray:
    logits, labels = _outputs(model, dataset)
    return F.cross_entropy(logits, labels, reduction="none").numpy()


def empirical_epsilon(member_scores: np.ndarray, non_member_scores: np.ndarray, delta: float = 1e-5,
                      confidence: float = 0.95) -> float:
    """The largest epsilon this attack proves at ``confidence`` (0.0 when it proves nothing).

    For each ROC threshold, ``log((TPR_low - delta) / FPR_high)`` with Clopper-Pearson bounds; the
    thresholds are all tried, so each bound is taken at ``1 - (1 - confidence) / m`` (Bonferroni over the
    ``m`` thresholds) and the maximum still holds at ``confidence``.
    """
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    fpr, tpr, _ = roc_curve(labels, np.r_[member_scores, non_member_scores])
    return _epsilon_from_roc(fpr, tpr, len(member_scores), len(non_member_scores), delta, confidence)


def _epsilon_from_roc(fpr: np.ndarray, tpr: np.ndarray, n_in: int, n_out: int, delta: float, confidence: float = 0.95) -> float:
    alpha = (1 - confidence) / (2 * len(fpr))  # two one-sided bounds per threshold, m thresholds
    tp, fp = np.round(tpr * n_in), np.round(fpr * n_out)
    tpr_low = np.where(tp > 0, beta.ppf(alpha, np.maximum(tp, 1), n_in - tp + 1), 0.0)
    fpr_high = np.where(fp < n_out, beta.ppf(1 - alpha, fp + 1, np.maximum(n_out - fp, 1)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.log((tpr_low - delta) / fpr_high)
    bounds = bounds[np.isfinite(bounds)]
    return float(max(0.0, bounds.max())) if len(bounds) else 0.0


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR with FPR <= target (0.0 if none)."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(name: str, member_scores: np.ndarray, non_member_scores: np.ndarray, delta: float = 1e-5) -> AttackResult:
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    scores = np.r_[member_scores, non_member_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    n_in, n_out = len(member_scores), len(non_member_scores)
    return AttackResult(name, float(roc_auc_score(labels, scores)), _tpr_at(fpr, tpr, 0.01), _tpr_at(fpr, tpr, 0.001),
                        _epsilon_from_roc(fpr, tpr, n_in, n_out, delta), n_in, n_out)


def loss_attack(model: nn.Module, members: Dataset, non_members: Dataset, delta: float = 1e-5) -> AttackResult:
    """The loss-threshold attack (module docstring)."""
    return attack_metrics("loss threshold", -_losses(model, members), -_losses(model, non_members), delta)


def lira_offline(model: Any, shadows: Sequence[Any], members: Dataset, non_members: Dataset, delta: float = 1e-5, *,
                 statistic: Callable[[Any, Dataset], np.ndarray] = true_class_logits, name: str = "LiRA offline") -> AttackResult:
    """Offline LiRA with shadow models trained without any candidate (module docstring).

    ``statistic(model, dataset)`` is the per-record quantity the test compares (higher = more member-like):
    the logit-scaled confidence for classifiers; a generator's audit passes its own
    (:func:`~secure_oneshot.research.generator_audit.generator_lira`).

    Raises:
        ValueError: fewer than 2 shadow models.
    """
    if len(shadows) < 2:
        raise ValueError("offline LiRA needs at least 2 shadow models")

    def scores(candidates: Dataset) -> np.ndarray:
        shadow_phi = np.stack([statistic(s, candidates) for s in shadows])  # (K, N)
        sigma = max(float(shadow_phi.std(axis=0).mean()), 1e-6)  # one global width: stable with few shadows
        return norm.cdf((statistic(model, candidates) - shadow_phi.mean(axis=0)) / sigma)

    return attack_metrics(f"{name} ({len(shadows)} shadows)", scores(members), scores(non_members), delta)

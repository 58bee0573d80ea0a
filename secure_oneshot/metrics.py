"""Classification metrics with MedMNIST's conventions (``medmnist.evaluator``), plus balanced accuracy."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["predict_scores", "classification_metrics", "evaluate_model"]


@torch.no_grad()
def predict_scores(model: nn.Module, dataset: Dataset, *, device: str = "cpu", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), softmax scores (N, classes)) in eval mode."""
    model.eval()
    labels, scores = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        scores.append(torch.softmax(model(x.to(device)), dim=1).float().cpu())
        labels.append(y)
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    recalls = [float((predicted[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls))


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``acc`` and ``auc`` exactly as MedMNIST computes them, and ``balanced_acc``.

    Every metric is NaN when a score is not finite (a diverged model: reported, not a crash); AUC is
    NaN without a warning when the labels hold a single class (a tiny site's validation slice, which
    may hold a single record).
    """
    if not np.isfinite(scores).all():
        return {"acc": float("nan"), "auc": float("nan"), "balanced_acc": float("nan")}
    from medmnist.evaluator import getACC, getAUC   # pulls in scikit-learn, SciPy and pandas: only when metrics are computed

    task = "binary-class" if scores.shape[1] == 2 else "multi-class"
    y_true = labels.reshape(-1, 1)  # (N,) -> (N, 1): medmnist's layout
    single_class = len(np.unique(labels)) < 2
    # medmnist squeezes a one-record split to a scalar and sklearn then refuses it: count directly there.
    acc = float((scores.argmax(1) == labels).mean()) if len(labels) < 2 else float(getACC(y_true, scores, task))
    return {
        "acc": acc,
        "auc": float("nan") if single_class else float(getAUC(y_true, scores, task)),
        "balanced_acc": _balanced_accuracy(labels, scores.argmax(1), scores.shape[1]),
    }


def evaluate_model(model: nn.Module, dataset: Dataset, *, device: str = "cpu") -> dict[str, float]:
    return classification_metrics(*predict_scores(model, dataset, device=device))

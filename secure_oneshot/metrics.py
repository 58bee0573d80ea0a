"""Classification metrics with MedMNIST's conventions (``medmnist.evaluator``), plus balanced accuracy.

Single-label tasks: softmax scores ``(N, classes)`` against labels ``(N,)``.  Multi-label tasks (labels
``(N, L)`` 0/1, e.g. ChestMNIST): sigmoid scores ``(N, L)``; ``auc`` is the per-label AUC averaged,
``acc`` the per-label accuracy at 0.5 averaged (medmnist's ``"multi-label, binary-class"``), and
``balanced_acc`` the per-label balanced accuracy at 0.5 averaged.  The task is read from the labels' shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["predict_scores", "classification_metrics", "evaluate_model", "MEDMNIST_MULTI_LABEL"]

MEDMNIST_MULTI_LABEL = "multi-label, binary-class"


@torch.no_grad()
def predict_scores(model: nn.Module, dataset: Dataset, *, device: str = "cpu", batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) in eval mode: softmax scores for labels ``(N,)``, per-label sigmoid scores for labels ``(N, L)``."""
    model.eval()
    labels, scores = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = model(x.to(device)).float()
        scores.append((torch.sigmoid(logits) if y.dim() == 2 else torch.softmax(logits, dim=1)).cpu())
        labels.append(y)
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    recalls = [float((predicted[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls))


def _multi_label_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    from medmnist.evaluator import getACC, getAUC

    # AUC needs both values in every label column; like the single-label case, NaN (no warning) otherwise.
    both = all(len(np.unique(labels[:, i])) == 2 for i in range(labels.shape[1]))
    # medmnist squeezes its inputs: a single record (or label) would lose an axis, so count directly there.
    squeezable = labels.shape[0] < 2 or labels.shape[1] < 2
    predicted = (scores > 0.5).astype(labels.dtype)
    acc = float((predicted == labels).mean()) if squeezable else float(getACC(labels, scores, MEDMNIST_MULTI_LABEL))
    auc = float(getAUC(labels, scores, MEDMNIST_MULTI_LABEL)) if both and not squeezable else float("nan")
    balanced = [_balanced_accuracy(labels[:, i], predicted[:, i], 2) for i in range(labels.shape[1])]
    return {"acc": acc, "auc": auc, "balanced_acc": float(np.mean(balanced))}


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``acc`` and ``auc`` exactly as MedMNIST computes them, and ``balanced_acc`` (multi-label: see the module docstring).

    Every metric is NaN when a score is not finite (a diverged model: reported, not a crash); AUC is
    NaN without a warning when the labels hold a single class (a tiny site's validation slice, which
    may hold a single record; multi-label: any label column with a single value).
    """
    if not np.isfinite(scores).all():
        return {"acc": float("nan"), "auc": float("nan"), "balanced_acc": float("nan")}
    if labels.ndim == 2:
        return _multi_label_metrics(labels, scores)
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

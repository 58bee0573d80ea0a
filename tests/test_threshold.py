"""The DP decision threshold: its mechanism, its choice, its effect on the model, its place in the DP record."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from secure_oneshot.client.label_counts import calibrate_sigma
from secure_oneshot.client.threshold import (EDGES, balanced_threshold, calibrate_threshold, margins, noisy_margin_histogram,
                                             shift_decision)
from secure_oneshot.client.train import PRESETS, train_classifier
from secure_oneshot.data import MedMNISTSplit, SiteData
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig
from secure_oneshot.policy.dp import compute_epsilon


def test_one_record_changes_one_cell_by_one() -> None:
    values, labels = np.array([-27.0, -0.7, 0.2, 3.3, 29.0]), np.array([0, 0, 1, 1, 1])
    base = noisy_margin_histogram(values, labels, 0.0)
    assert base.shape == (2, len(EDGES) + 1) and base.sum() == 5
    more = noisy_margin_histogram(np.append(values, 2.5), np.append(labels, 0), 0.0)
    diff = more - base
    assert np.abs(diff).sum() == 1 and diff.max() == 1                # L2 sensitivity 1
    assert base[0, 0] == 1 and base[1, -1] == 1                        # beyond the edges: the open end bins


def test_noise_is_calibrated_to_the_epsilon() -> None:
    sigma = calibrate_sigma(0.5, 1e-5)
    assert compute_epsilon("prv", ((sigma, 1.0, 1),), 1e-5) <= 0.5
    assert compute_epsilon("prv", ((sigma * 0.9, 1.0, 1),), 1e-5) > 0.5   # not more noise than needed
    draws = np.stack([noisy_margin_histogram(np.zeros(0), np.zeros(0), sigma, np.random.default_rng(i)) for i in range(400)])
    assert draws.std() == pytest.approx(sigma, rel=0.05)


def test_the_threshold_sits_between_shifted_classes() -> None:
    rng = np.random.default_rng(0)
    # a DP-like model: both classes' margins shifted towards class 1 by about 3 logits
    values = np.concatenate([rng.normal(2.0, 1.0, 300), rng.normal(5.0, 1.0, 900)])
    labels = np.concatenate([np.zeros(300), np.ones(900)])
    t = balanced_threshold(noisy_margin_histogram(values, labels, 0.0))
    assert 3.0 <= t <= 4.0
    assert -0.5 <= balanced_threshold(noisy_margin_histogram(values - 3.5, labels, 0.0)) <= 0.5
    # a degenerate picture (no class-0 records at all) keeps the smallest shift
    assert balanced_threshold(np.zeros((2, len(EDGES) + 1))) == 0.0


def test_shift_moves_every_margin_by_the_threshold() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(10, 1, 2, 2)
    before = margins(model, x)
    shift_decision(model, 2.5)
    assert np.allclose(margins(model, x), before - 2.5, atol=1e-5)
    with pytest.raises(ConfigError, match="binary"):
        shift_decision(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), 1.0)


def test_calibration_balances_a_biased_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 3.0]))                # margin = x + 3: everything predicted class 1
    x = torch.cat([torch.randn(200) - 1.0, torch.randn(600) + 1.0]).reshape(-1, 1, 1, 1)
    y = np.concatenate([np.zeros(200), np.ones(600)]).astype(np.int64)
    assert (margins(model, x) > 0).mean() > 0.95
    release = calibrate_threshold(model, x, y, 2.0, 1e-5, np.random.default_rng(1))
    predicted = margins(model, x) > 0
    balanced = ((~predicted[y == 0]).mean() + predicted[y == 1].mean()) / 2
    assert 2.0 <= release.threshold <= 4.0 and balanced > 0.75


def _tiny_site(n: int = 96, classes: int = 2) -> SiteData:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n).astype(np.int64)
    images = (rng.normal(size=(n, 28, 28)) * 20 + 80 + labels[:, None, None] * 40).clip(0, 255).astype(np.uint8)
    split = MedMNISTSplit("pneumoniamnist", "train", images, labels, classes, 1, "binary-class" if classes == 2 else "multi-class")
    return SiteData(split, split.subset(np.arange(16)), split.subset(np.arange(16, 48)))


def _dp(**overrides):  # type: ignore[no-untyped-def]
    return replace(PRESETS["dp"], epochs=1, dp_epsilon=4.0, accountant="rdp", max_physical_batch_size=32, **overrides)


def test_the_threshold_step_is_in_the_classifier_record_and_the_budget_holds() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_classifier(ClassifierConfig("small-cnn", 1, 2), _dp(threshold_epsilon=0.5, label_counts_epsilon=0.1), _tiny_site())
    assert result.threshold is not None and result.dp is not None
    sigma = result.threshold.noise_multiplier
    assert result.dp.history[-1] == (sigma, 1.0, 1)
    assert compute_epsilon("prv", ((sigma, 1.0, 1),), 1e-5) <= 0.5
    assert result.dp.epsilon == pytest.approx(compute_epsilon("rdp", result.dp.history, result.dp.delta))
    assert result.dp.epsilon <= 4.0


@pytest.mark.parametrize("cfg, classes, message", [
    (replace(PRESETS["dp"], threshold_epsilon=0.5), 2, "DP training only"),
    (_dp(threshold_epsilon=0.5), 3, "binary"),
    (_dp(threshold_epsilon=3.95, label_counts_epsilon=0.1), 2, "below dp_epsilon"),
])
def test_threshold_misconfigurations_are_refused_before_training(cfg, classes, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        train_classifier(ClassifierConfig("small-cnn", 1, classes), cfg, _tiny_site(classes=classes))

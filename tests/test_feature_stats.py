"""DP feature statistics: exact statistics, the noise the mechanism predicts, clipping, and the DP record.

The model is a tiny GroupNorm CNN (what Opacus makes of a BatchNorm one) on 300
synthetic 1x28x28 images in [-1, 1].  Its per-sample moment vectors have norms
1.67..1.91, so ``CLIP = 2.5`` (feature radius 2.5 * sqrt(1 - 0.5**2) = 2.17)
clips nothing and the noiseless release equals the true statistics exactly.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secure_oneshot.client.feature_stats import (
    FeatureStatsConfig,
    UnsafeFixedSeedWarning,
    _clip_with_count,
    calibrate_noise_multiplier,
    contribution_vectors,
    dp_feature_statistics,
    norm_layer_names,
    true_feature_statistics,
)
from secure_oneshot.errors import ConfigError, PrivacyError
from secure_oneshot.policy.dp import (
    DpRecord,
    composed_epsilon,
    compute_epsilon,
    verify_claim,
)

from .conftest import MEDMNIST_ROOT

pytestmark = pytest.mark.filterwarnings("ignore::secure_oneshot.client.feature_stats.UnsafeFixedSeedWarning")

N = 300
CLIP = 2.5
FP = "sha256:feature-stats-test"


def tiny_cnn(seed: int = 0, norm: str = "group") -> nn.Sequential:
    torch.manual_seed(seed)
    norm1, norm2 = (nn.GroupNorm(2, 8), nn.GroupNorm(4, 16)) if norm == "group" else (nn.BatchNorm2d(8), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), norm1, nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), norm2, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> nn.Sequential:
    return tiny_cnn()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def truth(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    return true_feature_statistics(model, images)


def cfg(epsilon: float = 1.0, **kwargs) -> FeatureStatsConfig:
    return FeatureStatsConfig(epsilon=epsilon, clip_norm=kwargs.pop("clip_norm", CLIP), seed=kwargs.pop("seed", 0),
                              dataset_fingerprint=kwargs.pop("dataset_fingerprint", FP), **kwargs)


def errors(stats: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: stats[name].double() - truth[name].double() for name in truth}


# --- names, shapes, exactness --------------------------------------------------------------------


def test_names_shapes_dtype_finite(model, images):
    stats, _ = dp_feature_statistics(model, images, cfg(epsilon=1.0))
    assert norm_layer_names(model) == ["1", "4"]
    assert sorted(stats) == ["1.mean", "1.var", "4.mean", "4.var"]
    for name, channels in (("1", 8), ("4", 16)):
        for stat in ("mean", "var"):
            tensor = stats[f"{name}.{stat}"]
            assert (tensor.dtype, tuple(tensor.shape)) == (torch.float32, (channels,))
            assert torch.isfinite(tensor).all()
        assert (stats[f"{name}.var"] >= 1e-6).all()


def test_true_statistics_are_the_pooled_mean_and_variance(model, images, truth):
    with torch.no_grad():
        inputs = {"1": model[:1](images), "4": model[:4](images)}  # (N, C_L, H, W) inputs of the GroupNorms
    for name, x in inputs.items():
        torch.testing.assert_close(truth[f"{name}.mean"], x.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(truth[f"{name}.var"], x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


def test_dataset_forms_and_batch_size_do_not_change_the_result(model, images, truth):
    labelled = TensorDataset(images, torch.zeros(N, dtype=torch.int64))
    for got in (true_feature_statistics(model, labelled, batch_size=7), true_feature_statistics(model, images, batch_size=1000)):
        for name in truth:
            torch.testing.assert_close(got[name], truth[name], rtol=1e-6, atol=1e-7)
    a, _ = dp_feature_statistics(model, labelled, cfg(batch_size=7))
    b, _ = dp_feature_statistics(model, images, cfg(batch_size=256))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


# --- accuracy: the noise the mechanism predicts ---------------------------------------------------


def test_huge_epsilon_approaches_the_true_statistics(model, images, truth):
    # epsilon 1e4 -> sigma 0.0075 (1e6 would need sigma < 1e-3, which the verifier refuses):
    # noise std sigma * CLIP / N ~ 6e-5 against values of scale ~0.4.  Measured: 2e-4 relative.
    # RDP: PRV's discretisation gives up above epsilon ~100 (the calibration hint says to switch).
    stats, record = dp_feature_statistics(model, images, cfg(epsilon=1e4, accountant="rdp"))
    scale = max(float(t.abs().max()) for t in truth.values())
    worst = max(float(e.abs().max()) for e in errors(stats, truth).values())
    assert record.history[0][0] < 0.01
    assert worst / scale < 2e-3


def predicted_std(truth: dict[str, torch.Tensor], layer: str, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order error std of a channel's mean and variance (module docstring), with nothing clipped."""
    c = 0.5 * CLIP
    mu, var = truth[f"{layer}.mean"].double(), truth[f"{layer}.var"].double()
    q = var + mu.square()  # mean of squares
    base = sigma * CLIP / N
    return base * torch.sqrt(1 + (mu / c) ** 2), base * torch.sqrt(1 + 4 * mu**2 + ((2 * mu**2 - q) / c) ** 2)


def test_small_epsilon_error_matches_the_predicted_noise(model, images, truth):
    # 20 seeds x 24 channels of standardised errors: their std must be 1 (the prediction), not
    # sigma/N (forgot the clip norm: 0.4) or sigma*CLIP (forgot to divide: huge).
    assert contribution_vectors(model, images, cfg()).norm(dim=1).max() < CLIP  # precondition
    sigma = calibrate_noise_multiplier(cfg(epsilon=1.0))
    z_mean, z_var = [], []
    for seed in range(20):
        errs = errors(dp_feature_statistics(model, images, cfg(epsilon=1.0, seed=seed))[0], truth)
        for layer in ("1", "4"):
            std_mean, std_var = predicted_std(truth, layer, sigma)
            z_mean.append(errs[f"{layer}.mean"] / std_mean)
            z_var.append(errs[f"{layer}.var"] / std_var)
    for z in (torch.cat(z_mean), torch.cat(z_var)):  # measured std: 1.02 (means), 0.96 (variances)
        assert 0.8 < float(z.std()) < 1.25
        assert abs(float(z.mean())) < 0.25
    assert sigma * CLIP / N > 0.03  # so the error is large: 300x the huge-epsilon case


def test_error_grows_as_epsilon_shrinks(model, images, truth):
    rms = []
    for epsilon in (8.0, 2.0, 0.5):
        errs = [errors(dp_feature_statistics(model, images, cfg(epsilon=epsilon, seed=s))[0], truth)
                for s in range(4)]
        rms.append(math.sqrt(float(torch.cat([e["4.mean"] for e in errs]).square().mean())))
    assert rms[0] < rms[1] < rms[2]


def test_release_is_the_documented_formula(model, images):
    # Known answer: regenerate the seed's noise and apply the module docstring's estimator by hand.
    config = cfg(epsilon=2.0, clip_norm=1.0, seed=5)  # clip_norm 1 clips every record here
    stats, record = dp_feature_statistics(model, images, config)
    sums = contribution_vectors(model, images, config).sum(dim=0)  # (1 + 48,)
    noise = torch.randn(sums.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noisy = sums + record.history[0][0] * 1.0 * noise
    count = max(float(noisy[0]) / 0.5, 1.0)  # c = count_weight * clip_norm
    assert count != N  # the count is released with noise too
    mean, mean_square = noisy[1:9] / count, noisy[9:17] / count  # layer "1": 8 means, then 8 mean squares
    torch.testing.assert_close(stats["1.mean"], mean.float())
    torch.testing.assert_close(stats["1.var"], (mean_square - mean.square()).clamp(min=1e-6).float())


# --- clipping ------------------------------------------------------------------------------------


def test_an_outlier_changes_the_noiseless_sum_by_at_most_the_clip_norm(model, images):
    config = cfg(clip_norm=1.0)
    batch = images[:20]
    outlier = images[:1] * 1e4  # huge activations everywhere
    without = contribution_vectors(model, batch, config)  # (20, 1 + 48)
    with_outlier = contribution_vectors(model, torch.cat([batch, outlier]), config)  # (21, 1 + 48)
    assert with_outlier.norm(dim=1).max() <= 1.0 + 1e-9
    assert torch.equal(with_outlier[:, 0], torch.full((21,), 0.5, dtype=torch.float64))  # count component c
    change = with_outlier.sum(dim=0) - without.sum(dim=0)
    assert float(change.norm()) <= 1.0 + 1e-9
    raw = contribution_vectors(model, outlier, cfg(clip_norm=1e12))
    assert float(raw[0, 1:].norm()) > 1e6  # the outlier really was huge before clipping


def test_non_finite_contributions_become_zero():
    features = torch.tensor([[3.0, 4.0], [float("nan"), 1.0], [0.3, 0.4]], dtype=torch.float64)
    clipped = _clip_with_count(features, cfg(clip_norm=2.0))  # c = 1, radius sqrt(3)
    assert torch.equal(clipped[1], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(clipped[0, 1:], torch.tensor([3.0, 4.0], dtype=torch.float64) * math.sqrt(3) / 5)
    torch.testing.assert_close(clipped[2, 1:], features[2])  # inside the ball: unchanged


def test_eval_mode_keeps_contributions_per_sample_and_restores_modes(images):
    bn_model = tiny_cnn(norm="batch").train()
    running = bn_model[1].running_mean.clone()
    config = cfg(layer_types=(nn.BatchNorm2d,))
    alone = contribution_vectors(bn_model, images[:1], config)
    in_batch = contribution_vectors(bn_model, images[:50], config)
    torch.testing.assert_close(alone[0], in_batch[0])  # train-mode BatchNorm would mix the batch
    assert bn_model.training and bn_model[1].training
    assert torch.equal(bn_model[1].running_mean, running)


def test_layer_selection(model, images):
    with pytest.raises(ValueError, match="no layers of types"):
        dp_feature_statistics(model, images, cfg(layer_types=(nn.BatchNorm2d,)))
    stats = true_feature_statistics(model, images, layer_types=(nn.GroupNorm,))
    assert sorted(stats) == ["1.mean", "1.var", "4.mean", "4.var"]


# --- the DP record -------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_record_verifies_and_is_within_budget(model, images, accountant):
    _, record = dp_feature_statistics(model, images, cfg(epsilon=1.0, accountant=accountant))
    assert record.accountant == accountant and record.sampling == "fixed"
    assert record.history == ((record.history[0][0], 1.0, 1),)
    assert (record.max_grad_norm, record.delta, record.dataset_fingerprint) == (CLIP, 1e-5, FP)
    assert 0.95 < verify_claim(record) <= 1.0 + 1e-9
    assert record.epsilon <= 1.0
    assert verify_claim(DpRecord.from_json(record.to_json(), "test")) == pytest.approx(record.epsilon)


def test_record_composes_with_the_training_record(model, images):
    _, stats_record = dp_feature_statistics(model, images, cfg(epsilon=1.0))
    history = ((1.0, 0.01, 3000),)  # a DP-SGD run at epsilon 3.5
    training = DpRecord("rdp", history, 1e-5, compute_epsilon("rdp", history, 1e-5), 1.0, "poisson", FP, {})
    # RDP composition is sublinear: 3.51 + (1.0 alone) -> 3.69 at 1e-5.  Compare at one delta; across
    # deltas it can fail (training at epsilon 14.9 / delta 1e-5 composes to 14.5 at delta 2e-5).
    for delta in (1e-5, 2e-5):
        both = composed_epsilon([training, stats_record], delta)
        assert both > composed_epsilon([training], delta) + 0.1
        assert both > composed_epsilon([stats_record], delta)
    assert composed_epsilon([training, stats_record], 2e-5) > max(training.epsilon, stats_record.epsilon)
    other = DpRecord("rdp", history, 1e-5, training.epsilon, 1.0, "poisson", "sha256:other", {})
    with pytest.raises(ValueError, match="different datasets"):
        composed_epsilon([other, stats_record], 2e-5)


def test_sigma_for_epsilon_1_and_8():
    assert calibrate_noise_multiplier(cfg(epsilon=1.0, accountant="rdp")) == pytest.approx(4.06, abs=0.02)
    assert calibrate_noise_multiplier(cfg(epsilon=8.0, accountant="rdp")) == pytest.approx(0.638, abs=0.01)
    # the default, PRV: less noise for the same budget (Opacus's own noise search at sample rate 1, one step)
    assert calibrate_noise_multiplier(cfg(epsilon=1.0)) == pytest.approx(3.79, abs=0.02)
    assert calibrate_noise_multiplier(cfg(epsilon=8.0)) == pytest.approx(0.601, abs=0.01)


def test_a_tenth_of_a_composed_budget_of_1_is_certified():
    """A DP cell at epsilon 1 gives the statistics 0.1: below what RDP's conversion can certify for one release
    (the default accountant must be one that can)."""
    with pytest.raises(PrivacyError, match="cannot calibrate"):
        calibrate_noise_multiplier(cfg(epsilon=0.1, accountant="rdp"))
    sigma = calibrate_noise_multiplier(cfg(epsilon=0.1))
    assert compute_epsilon("prv", ((sigma, 1.0, 1),), 1e-5) <= 0.1


# --- config, seeds, failures ---------------------------------------------------------------------


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as info:
        FeatureStatsConfig(epsilon=-1.0, accountant="gdp", count_weight=1.0, batch_size=0, layer_types=())
    for field in ("epsilon", "accountant", "count_weight", "batch_size", "layer_types"):
        assert field in info.value.message


def test_empty_fingerprint_and_unreachable_budget_fail_before_reading_data(model):
    unreadable = object()  # any attempt to iterate it would raise TypeError
    with pytest.raises(ConfigError, match="dataset_fingerprint"):
        dp_feature_statistics(model, unreadable, cfg(dataset_fingerprint=""))  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="cannot calibrate"):
        dp_feature_statistics(model, unreadable, cfg(epsilon=0.01, accountant="rdp"))  # type: ignore[arg-type]


def test_seeds(model, images):
    a, _ = dp_feature_statistics(model, images, cfg(seed=3))
    b, _ = dp_feature_statistics(model, images, cfg(seed=3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.warns(UnsafeFixedSeedWarning, match="remove the noise"):
        dp_feature_statistics(model, images, cfg(seed=3))
    fresh = [dp_feature_statistics(model, images, cfg(seed=None))[0]["1.mean"] for _ in range(2)]
    assert not torch.equal(fresh[0], fresh[1]) and not torch.equal(fresh[0], a["1.mean"])


# --- real data (cheap: 546 BreastMNIST training images) -------------------------------------------


def test_breastmnist_release_is_close_at_epsilon_8(model):
    path = MEDMNIST_ROOT / "breastmnist.npz"
    if not path.is_file():
        if os.environ.get("SECURE_ONESHOT_REQUIRE_DATA") == "1":
            pytest.fail(f"{path} is missing")
        pytest.skip(f"{path} is missing")
    with np.load(path, allow_pickle=False) as npz:
        pixels = npz["train_images"]
    images = torch.from_numpy(pixels).float().div(127.5).sub(1.0).unsqueeze(1)  # (546, 28, 28) -> (546, 1, 28, 28)
    truth = true_feature_statistics(model, images)
    # Moment norms reach 3.77 here; clip_norm 4.5 (feature radius 3.9) clips nothing.  Measured: 0.01-0.03.
    stats, _ = dp_feature_statistics(model, TensorDataset(images), cfg(epsilon=8.0, clip_norm=4.5))
    scale = max(float(t.abs().max()) for t in truth.values())
    worst = max(float(e.abs().max()) for e in errors(stats, truth).values())
    assert worst / scale < 0.05

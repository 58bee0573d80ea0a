"""Server-side learning: the batched ensemble, FedISCA inversion, and distillation on a toy task.

Toy task (8 px, 1 channel, 2 classes): class 0 has a bright left half, class 1 a
bright right half, plus Gaussian noise.  Two tiny BatchNorm CNN "sites" each
train on their own half of 512 images and reach 1.0 test accuracy.
Distillation with 5 epochs x 30 inversion steps x 32 images (lr 0.01) gave a
student test accuracy of 1.0 for each of 8 seeds measured (the worst
first-epoch accuracy was 0.986); untrained students score 0.48-0.52.  The test
asserts >= 0.75.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secure_oneshot.client.feature_stats import true_feature_statistics
from secure_oneshot.errors import ConfigError
from secure_oneshot.metrics import evaluate_model
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.distill import DistillConfig, distill, kd_loss, learning_rate, per_image_kd, recalibrate_bn
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import PLAIN_LOOP, Execution
from secure_oneshot.server.synthesis import (
    BNStatHooks,
    InversionConfig,
    normalize_feature_stats,
    synthesize_batch,
    total_variation,
)

SIZE = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int, norm: str = "batch", classes: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    n1, n2 = (nn.BatchNorm2d(8), nn.BatchNorm2d(16)) if norm == "batch" else (nn.GroupNorm(2, 8), nn.GroupNorm(4, 16))
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), n1, nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), n2, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def small_cnn(seed: int, classes: int = 3) -> nn.Module:
    """The registry's small CNN with random (not default) running statistics, so the sites really differ."""
    torch.manual_seed(seed)
    model = build_classifier(ClassifierConfig("small-cnn", 1, classes))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g) * 0.5 - 0.5  # (n, 1, 8, 8)
    x[y == 0, :, :, : SIZE // 2] += 1.0
    x[y == 1, :, :, SIZE // 2:] += 1.0
    return x, y


def train_site(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def toy_sites() -> list[nn.Module]:
    x, y = toy_data(512, 0)
    return [train_site(tiny(1), x[:256], y[:256]), train_site(tiny(2), x[256:], y[256:])]


@pytest.fixture(scope="module")
def toy_test() -> TensorDataset:
    return TensorDataset(*toy_data(1000, 1))


def inversion(**kwargs) -> InversionConfig:
    defaults = {"batch_size": 32, "steps": 30, "image_size": SIZE, "jitter": 1, "num_classes": 2}
    return InversionConfig(**{**defaults, **kwargs})


# --- ensemble ------------------------------------------------------------------------------------


def test_batched_ensemble_matches_the_loop():
    sites = [small_cnn(seed) for seed in range(3)]
    x = torch.randn(6, 1, 16, 16)
    batched, looped = Ensemble(sites), Ensemble(sites, batched=False)
    assert batched.batched and not looped.batched
    per_site = batched.per_site_logits(x)
    assert per_site.shape == (3, 6, 3) and batched(x).shape == (6, 3)
    torch.testing.assert_close(per_site, looped.per_site_logits(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(batched(x), torch.stack([m(x) for m in sites]).mean(0), rtol=0, atol=1e-5)


def test_noise_adapted_batched_matches_the_loop_and_updates_running_stats():
    sites = [small_cnn(seed) for seed in range(2)]
    x = torch.randn(6, 1, 16, 16)
    batched, looped = Ensemble(sites, adapt_bn=True), Ensemble(sites, batched=False, adapt_bn=True)
    torch.testing.assert_close(batched.per_site_logits(x), looped.per_site_logits(x), rtol=0, atol=1e-5)
    stacked = batched._stacked_state()[1]["features.1.running_mean"]  # (S, 32)
    torch.testing.assert_close(stacked, torch.stack([m.features[1].running_mean for m in looped.sites]))
    assert not torch.equal(stacked[0], sites[0].features[1].running_mean)  # updated, and only in the copy


def test_ensemble_leaves_the_site_models_alone_and_ignores_train():
    site = small_cnn(0).train()
    before = copy.deepcopy(site.state_dict())
    ensemble = Ensemble([site, small_cnn(1)]).train()
    ensemble(torch.randn(4, 1, 16, 16))
    assert site.training and all(p.requires_grad for p in site.parameters())
    assert all(torch.equal(before[k], v) for k, v in site.state_dict().items())
    assert not any(m.training for m in ensemble.hook_modules()[0].modules())


def test_heterogeneous_sites_use_the_loop():
    sites = [small_cnn(0, classes=2), tiny(1)]
    ensemble = Ensemble(sites)
    assert not ensemble.batched
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(ensemble(x), (sites[0](x) + sites[1].eval()(x)) / 2)
    with pytest.raises(ValueError, match="one architecture"):
        Ensemble(sites, batched=True)


# --- BN statistics loss --------------------------------------------------------------------------


def matched_to(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm layer's running stats to its input's batch statistics on ``x`` (in layer order)."""
    model = copy.deepcopy(model).eval()
    for name, layer in model.named_modules():
        if isinstance(layer, nn.BatchNorm2d):  # earlier layers are already matched, so this input is final
            stats = true_feature_statistics(model, x, layer_types=(nn.BatchNorm2d,))
            layer.running_mean.copy_(stats[f"{name}.mean"])
            layer.running_var.copy_(stats[f"{name}.var"])
    return model


@pytest.mark.parametrize("batched", [True, False])
def test_bn_loss_is_zero_when_batch_stats_equal_running_stats(batched):
    x = torch.randn(16, 1, 16, 16)
    sites = [matched_to(small_cnn(seed), x) for seed in range(2)]
    with BNStatHooks(Ensemble(sites, batched=batched)) as hooks:
        _, zero = hooks.per_site(x)
        _, positive = hooks.per_site(torch.randn(16, 1, 16, 16) * 2 + 1)
    assert hooks.layer_counts == [3, 3]
    assert abs(float(zero)) < 1e-4 and float(positive) > 1.0


def identity_bn(channels: int = 1) -> nn.BatchNorm2d:
    """Eval-mode identity: weight 1, bias 0, running mean 0, running var 1 - eps."""
    bn = nn.BatchNorm2d(channels).eval()
    bn.running_var.fill_(1.0 - bn.eps)
    return bn


def test_bn_loss_is_normalised_per_model():
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2)]
    one = nn.Sequential(identity_bn(), *copy.deepcopy(head))
    two = nn.Sequential(identity_bn(), identity_bn(), *copy.deepcopy(head))  # both layers see the same input
    x = torch.randn(16, 1, 8, 8) * 3 + 2
    with BNStatHooks(Ensemble([one, two])) as hooks:
        _, per_site = hooks.site_losses(x)
        total = hooks.weighted(per_site)
    mean, var = x.mean(), x.var(unbiased=False)
    distance = (mean.abs() + (var - (1 - 1e-5)).abs()).item()  # one layer's ||mu - 0|| + ||var - running_var||
    assert hooks.layer_counts == [1, 2]
    torch.testing.assert_close(per_site, torch.tensor([distance, distance]), rtol=1e-4, atol=1e-4)  # not 2x
    torch.testing.assert_close(total, torch.tensor(1.5 * 2 * distance), rtol=1e-4, atol=1e-4)


def test_feature_statistics_drive_the_loss_for_groupnorm_models():
    x = torch.randn(16, 1, SIZE, SIZE)
    sites = [tiny(seed, norm="group") for seed in range(2)]
    stats = [true_feature_statistics(m, x) for m in sites]  # flat "<layer>.mean"/".var", as released
    assert set(normalize_feature_stats(stats[0])) == {"1", "5"}
    for batched in (True, False):
        with BNStatHooks(Ensemble(sites, batched=batched), stats) as hooks:
            assert hooks.active and hooks.layer_counts == [2, 2]
            assert abs(float(hooks.per_site(x)[1])) < 1e-4
            assert float(hooks.per_site(x * 3 + 1)[1]) > 1.0
    with pytest.raises(ValueError, match="lacks"):
        BNStatHooks(Ensemble(sites), [{"nope.mean": torch.zeros(1), "nope.var": torch.ones(1)}] * 2)


# --- inversion -----------------------------------------------------------------------------------


def test_inversion_loss_decreases_and_snapshots_arrive(toy_sites):
    totals, snapshots = [], []
    cfg = inversion(steps=40, snapshot_every=4, batch_size=20)
    x, y = synthesize_batch(toy_sites, None, cfg, on_loss=lambda step, losses: totals.append(losses["total"]),
                            on_snapshot=lambda step, snap: snapshots.append((step, snap)))
    totals_t = torch.stack(totals)
    assert len(totals) == 40 and totals_t[-5:].mean() < 0.5 * totals_t[:2].mean()
    assert [step for step, _ in snapshots] == list(range(4, 41, 4))
    assert all(s.device == x.device and s.shape == (20, 1, SIZE, SIZE) for _, s in snapshots)
    assert not torch.equal(snapshots[0][1], snapshots[-1][1])  # copies, not views of the optimised tensor
    torch.testing.assert_close(snapshots[-1][1], x)
    assert torch.bincount(y).tolist() == [10, 10] and y.tolist()[:4] == [0, 1, 0, 1]


def test_inversion_is_reproducible_and_batched_equals_loop(toy_sites):
    a, _ = synthesize_batch(toy_sites, Ensemble(toy_sites), inversion(steps=5, seed=3), execution=PLAIN_LOOP)
    b, _ = synthesize_batch(toy_sites, Ensemble(toy_sites, batched=False), inversion(steps=5, seed=3), execution=PLAIN_LOOP)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_fast_execution_computes_the_same_inversion_as_the_plain_loop():
    """bf16 autocast + channels_last change rounding only.  Measured on small-cnn sites over 5 steps: every loss
    term within 0.03% of float32 NCHW, mean pixel difference 0.002 (Adam's sign-like first steps move a few
    near-zero-gradient pixels the other way, so the max is not a useful measure).  Asserted: 1% and 0.01."""
    sites = [small_cnn(seed, classes=2) for seed in range(3)]
    cfg = InversionConfig(batch_size=16, steps=5, num_classes=2, seed=1)
    fast_losses: list[dict[str, torch.Tensor]] = []
    plain_losses: list[dict[str, torch.Tensor]] = []
    fast, _ = synthesize_batch(sites, None, cfg, execution=Execution(device="cpu", precision="bf16", channels_last=True),
                               on_loss=lambda step, losses: fast_losses.append(losses))
    plain, _ = synthesize_batch(sites, None, cfg, execution=PLAIN_LOOP, on_loss=lambda step, losses: plain_losses.append(losses))
    for f, p in zip(fast_losses, plain_losses):
        assert all(abs(float(f[k] / p[k]) - 1) < 0.01 for k in ("ce", "bn", "tv")), (f, p)
    assert 0 < float((fast - plain).abs().mean()) < 0.01  # > 0: it really ran in another precision


def test_bn_free_sites_need_a_prior():
    sites = [tiny(seed, norm="group") for seed in range(2)]
    with pytest.raises(ValueError, match="BN-free models need feature statistics or a student"):
        synthesize_batch(sites, None, inversion(steps=2))
    x, _ = synthesize_batch(sites, None, inversion(steps=2), allow_ce_only=True)
    assert x.shape == (32, 1, SIZE, SIZE)


def test_adversarial_term_with_a_student_leaves_the_student_alone():
    sites = [tiny(seed, norm="group") for seed in range(2)]
    student = tiny(5).train()
    before = copy.deepcopy(student.state_dict())
    seen: list[dict[str, torch.Tensor]] = []
    synthesize_batch(sites, None, inversion(steps=3), student=student, on_loss=lambda s, losses: seen.append(losses))
    assert "adv" in seen[0] and float(seen[0]["adv"]) >= 0
    assert student.training and all(p.requires_grad and p.grad is None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_total_variation_of_a_constant_is_zero():
    assert float(total_variation(torch.ones(2, 1, 5, 5))) == 0.0
    assert float(total_variation(torch.randn(2, 1, 5, 5))) > 0.0


# --- distillation --------------------------------------------------------------------------------


def test_kd_loss_and_schedule():
    t = torch.randn(8, 3)
    assert abs(float(kd_loss(t, t, 20.0))) < 1e-6
    s = torch.randn(8, 3)
    p, log_q = torch.softmax(t / 4, 1), torch.log_softmax(s / 4, 1)
    expected = (p * (p.log() - log_q)).sum(1).mean() * 16
    torch.testing.assert_close(kd_loss(s, t, 4.0), expected)
    cfg = DistillConfig(epochs=100)
    # 0-based epochs 49 and 74 are the published loop's epochs 50 and 75, the first at each lower rate
    assert [learning_rate(cfg, e) for e in (0, 48, 49, 73, 74, 99)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


def test_configs_reject_bad_values():
    with pytest.raises(ConfigError, match="noise_adapted"):
        DistillConfig(noise_adapted="maybe")
    with pytest.raises(ConfigError, match="steps.*snapshot_every|snapshot_every"):
        InversionConfig(steps=0, snapshot_every=0)


def test_distillation_learns_the_toy_task(toy_sites, toy_test):
    assert all(evaluate_model(m, toy_test)["acc"] == 1.0 for m in toy_sites)
    before = [copy.deepcopy(m.state_dict()) for m in toy_sites]
    student = tiny(10)
    untrained = evaluate_model(student, toy_test)["acc"]
    records: list[dict[str, float]] = []
    result = distill(student, toy_sites, inversion(), DistillConfig(epochs=5, lr=0.01), eval_set=toy_test,
                     on_epoch=records.append)
    assert 0.35 <= untrained <= 0.65
    assert result.student is student and records == result.history and len(records) == 5
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5] and records[-1]["lr"] == pytest.approx(1e-4)
    assert evaluate_model(student, toy_test)["acc"] >= 0.75  # measured 1.0 on 8 seeds
    assert all(torch.equal(b[k], v) for b, m in zip(before, toy_sites) for k, v in m.state_dict().items())


@pytest.mark.parametrize("mode", ["eval", "none"])
def test_other_noise_adaptation_modes_run(toy_sites, mode):
    result = distill(tiny(11), toy_sites, inversion(steps=4), DistillConfig(epochs=1, lr=0.01, noise_adapted=mode))
    assert len(result.history) == 1 and result.history[0]["loss"] > 0


def test_distillation_from_groupnorm_sites_with_the_adversarial_term():
    sites = [tiny(seed, norm="group") for seed in range(2)]
    with pytest.raises(ValueError, match="BN-free"):
        distill(tiny(12), sites, inversion(steps=2), DistillConfig(epochs=1))
    result = distill(tiny(12), sites, inversion(steps=4), DistillConfig(epochs=1), adversarial=True)
    assert result.history[0]["loss"] >= 0


def test_batched_teacher_gives_the_loops_input_gradients():
    """Same logits and same d(logits)/d(input) within 1e-5 (float32, small-cnn x 3)."""
    sites = [small_cnn(seed) for seed in range(3)]
    grads = []
    for batched in (True, False):
        x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        Ensemble(sites, batched=batched)(x).square().sum().backward()
        grads.append(x.grad)
    assert float(grads[0].abs().max()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)


def test_noise_adapted_teacher_depends_on_the_batch_and_the_eval_variant_does_not():
    sites = [small_cnn(seed) for seed in range(2)]
    x, other = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16) * 3 + 1
    adapted = Ensemble(sites, adapt_bn=True)
    alone = adapted(x[:4])
    mixed = adapted(torch.cat([x[:4], other[:4]]))[:4]  # the same 4 images normalised with another batch's statistics
    assert float((alone - mixed).abs().max()) > 1e-3
    frozen = Ensemble(sites, adapt_bn=True).set_adapt_bn(False)  # the eval variant after its refresh
    torch.testing.assert_close(frozen(x[:4]), frozen(torch.cat([x[:4], other[:4]]))[:4], rtol=0, atol=1e-5)


def test_bn_free_sites_have_an_empty_bn_loss():
    sites = [tiny(seed, norm="group") for seed in range(2)]
    with BNStatHooks(Ensemble(sites)) as hooks:
        logits, loss = hooks.per_site(torch.randn(4, 1, SIZE, SIZE))
    assert hooks.layer_counts == [0, 0] and not hooks.active
    assert logits.shape == (2, 4, 2) and float(loss) == 0.0


def test_recalibrated_student_bn_statistics_are_the_plain_average_over_the_snapshots():
    student = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(SIZE * SIZE, 2)).train()
    snapshots = [(torch.randn(16, 1, SIZE, SIZE) + shift, torch.ones(16)) for shift in (1.0, 3.0)]
    recalibrate_bn(student, snapshots, PLAIN_LOOP)
    bn = student[0]
    expected = torch.stack([x.mean() for x, _ in snapshots]).mean()
    torch.testing.assert_close(bn.running_mean, expected.reshape(1))
    assert bn.momentum == 0.1 and student.training and int(bn.num_batches_tracked) == 2


def test_per_image_weights_mix_the_two_teachers():
    s, t, n = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    a = torch.tensor([0.0, 0.25, 0.75, 1.0])
    mixed = a * per_image_kd(s, t, 20.0) + (1 - a) * per_image_kd(s, n, 20.0)
    torch.testing.assert_close(mixed[0], per_image_kd(s, n, 20.0)[0])
    torch.testing.assert_close(mixed[3], per_image_kd(s, t, 20.0)[3])
    torch.testing.assert_close(per_image_kd(s, t, 4.0).mean(), kd_loss(s, t, 4.0))


def test_compiled_student_trains_the_same_parameters(toy_sites):
    """torch.compile wraps the training step only; the returned student is the caller's module, trained."""
    student = tiny(13)
    before = copy.deepcopy(student.state_dict())
    fast = Execution(device="cpu", precision="fp32", channels_last=False, compile=True)
    result = distill(student, toy_sites, inversion(steps=3), DistillConfig(epochs=1, lr=0.01), execution=fast)
    assert result.student is student and result.history[0]["loss"] > 0
    assert not torch.equal(before["0.weight"], student.state_dict()["0.weight"])


def test_groupnorm_sites_on_cpu_run_without_channels_last():
    """CPU GroupNorm is 4.6x slower in channels_last + bf16 (measured 294 ms vs 64 ms per ensemble step)."""
    fast = Execution(device="cpu", channels_last=True)
    assert not fast.for_models([tiny(0, norm="group")]).channels_last
    assert fast.for_models([tiny(0)]).channels_last

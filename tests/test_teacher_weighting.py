"""Per-site, per-class teacher weighting: the equal teacher is unchanged, a degenerate site is neutralised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.ensemble import Ensemble, normalise_weights
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.site_models import _label_counts
from secure_oneshot.server.study import DistillJob, SiteModel, teacher_weights
from secure_oneshot.server.synthesis import InversionConfig
from secure_oneshot.server.weighting import LABEL_COUNT_FLOOR, agreement_weights, cohen_kappa, label_count_weights


class MeanSign(nn.Module):
    """A 'good' site: class 1 when the image's mean pixel is positive (logits -k*m, +k*m, plus an offset)."""

    def __init__(self, k: float, offset: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-k], [k]]))
            self.fc.bias.copy_(torch.tensor([offset, offset]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def always_class_0() -> MeanSign:
    """A degenerate site: ignores the image, class 0 with logits (20, -20)."""
    model = MeanSign(0.0)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([20.0, -20.0]))
    return model


def small_cnns(n: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [build_classifier(ClassifierConfig("small-cnn", 1, 2, "batch")).eval() for _ in range(n)]


def images(n: int = 64, sign: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Images whose mean pixel has the given sign (class 1 for +, class 0 for -), margins from small to large."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    shift = sign * torch.linspace(0.05, 1.0, n)
    return x - x.mean(dim=(1, 2, 3), keepdim=True) + shift[:, None, None, None]


# --- equal weights: today's teacher, bit for bit -------------------------------------------------


def test_equal_is_the_plain_mean_of_logits_bit_for_bit() -> None:
    models = small_cnns(3)
    x = torch.randn(8, 1, 28, 28)
    reference = torch.stack([m(x) for m in models]).mean(dim=0)
    assert torch.equal(Ensemble(models, batched=False)(x), reference)
    batched = Ensemble(models, batched=True)
    assert batched.weights is None
    assert torch.equal(batched(x), batched.per_site(x)[0].mean(dim=0))  # no rescaling on the equal path
    torch.testing.assert_close(batched(x), reference, rtol=1e-5, atol=1e-5)


def test_uniform_weights_give_the_equal_teachers_probabilities() -> None:
    models = small_cnns(3)
    x = torch.randn(8, 1, 28, 28)
    uniform = Ensemble(models, batched=False, weights=torch.ones(3, 2))
    torch.testing.assert_close(uniform(x).softmax(-1), Ensemble(models, batched=False)(x).softmax(-1), rtol=1e-5, atol=1e-6)


def test_batched_and_looped_weighted_paths_agree() -> None:
    models = small_cnns(4, seed=1)
    w = torch.tensor([[1.0, 0.2], [0.0, 3.0], [2.0, 2.0], [0.5, 0.0]])
    x = torch.randn(8, 1, 28, 28)
    batched, looped = Ensemble(models, batched=True, weights=w), Ensemble(models, batched=False, weights=w)
    torch.testing.assert_close(batched(x), looped(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.per_site_logits(x), looped.per_site_logits(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.weights, normalise_weights(w, 4))


def test_weighted_teacher_is_the_weighted_sum_of_log_probabilities() -> None:
    models = small_cnns(3, seed=2)
    w = torch.tensor([[3.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.randn(5, 1, 28, 28)
    expected = sum(nw[None, :] * m(x).log_softmax(-1) for nw, m in zip(normalise_weights(w, 3), models))
    torch.testing.assert_close(Ensemble(models, batched=False, weights=w)(x), expected, rtol=1e-5, atol=1e-6)


# --- a degenerate site ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["label-counts", "agreement"])
def test_a_site_that_always_says_class_0_cannot_flip_class_1(scheme: str) -> None:
    good = [MeanSign(4.0, offset=1.0), MeanSign(2.0, offset=-3.0)]   # offsets: logits are only defined up to a shift
    sites = [*good, always_class_0()]
    class_1 = images(64, +1.0)
    if scheme == "label-counts":
        weights = label_count_weights([torch.tensor([500.0, 480.0]), torch.tensor([300.0, 320.0]), torch.tensor([14.0, 0.0])], 2)
    else:  # decisions on a class-balanced batch vs the classes it shows
        probe = torch.cat([images(32, -1.0, seed=1), images(32, +1.0, seed=2)])
        targets = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
        weights = agreement_weights(Ensemble(sites, batched=False).per_site_logits(probe), targets)
    good_only = Ensemble(good, batched=False)(class_1).softmax(-1)
    weighted = Ensemble(sites, batched=False, weights=weights)(class_1).softmax(-1)
    equal = Ensemble(sites, batched=False)(class_1).softmax(-1)
    # The equal ensemble is ruined by the degenerate site (so this test can fail) ...
    assert (equal.argmax(-1) == 0).float().mean() > 0.5
    assert (good_only.argmax(-1) == 1).all()
    # ... the weighted one decides as the good sites do, within 0.05 in probability.
    assert torch.equal(weighted.argmax(-1), good_only.argmax(-1))
    assert (weighted[:, 1] - good_only[:, 1]).abs().max() < 0.05


def test_distill_gives_the_weights_to_the_teacher_and_the_noise_adapted_teacher(monkeypatch) -> None:
    """The inversion, the noise-adapted teacher and the KD targets all use the weighted ensemble."""
    from secure_oneshot.server import distill as distill_module
    from secure_oneshot.server.synthesis import InversionConfig

    built: list[tuple[bool, object]] = []
    real = distill_module.Ensemble

    def recording(*args, **kwargs):
        ensemble = real(*args, **kwargs)
        built.append((kwargs.get("adapt_bn", False), ensemble.weights))
        return ensemble

    monkeypatch.setattr(distill_module, "Ensemble", recording)
    models = small_cnns(2)
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    synth = InversionConfig(batch_size=4, steps=2, snapshot_every=1, num_classes=2, channels=1, image_size=28)
    distill_module.distill(small_cnns(1, seed=1)[0].train(), models, synth, distill_module.DistillConfig(epochs=1),
                           teacher_weights=w)
    assert [adapt for adapt, _ in built] == [False, True]
    for _, weights in built:
        torch.testing.assert_close(weights, normalise_weights(w, 2))


def test_misshapen_or_non_finite_weights_are_refused() -> None:
    models = small_cnns(2)
    with pytest.raises(ValueError, match="shape"):
        Ensemble(models, weights=torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite"):
        Ensemble(models, weights=torch.tensor([[1.0, float("nan")], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="classes"):
        Ensemble(models, weights=torch.ones(2, 3))(torch.randn(2, 1, 28, 28))


# --- the schemes ----------------------------------------------------------------------------------


def test_label_count_weights_clamp_negatives_and_fill_absent_sites_with_the_mean() -> None:
    weights = label_count_weights([torch.tensor([10.0, -3.0]), None, torch.tensor([2.5, 0.0])], 2)
    f = LABEL_COUNT_FLOOR
    expected = torch.tensor([[10.0 + f, 0.0 + f], [6.25 + f, 0.0 + f], [2.5 + f, 0.0 + f]])
    torch.testing.assert_close(weights, expected)
    normalised = normalise_weights(weights, 3)
    torch.testing.assert_close(normalised.sum(dim=0), torch.ones(2))
    torch.testing.assert_close(normalised[:, 1], torch.full((3,), 1 / 3))  # nobody has class 1: equal


def test_label_count_weights_refuse_nothing_to_go_on_and_bad_counts() -> None:
    with pytest.raises(ConfigError, match="at least one site"):
        label_count_weights([None, None], 2)
    with pytest.raises(ConfigError, match="2 finite"):
        label_count_weights([torch.tensor([1.0, 2.0, 3.0])], 2)
    with pytest.raises(ConfigError, match="2 finite"):
        label_count_weights([torch.tensor([1.0, float("inf")])], 2)


def test_site_label_counts_artifact_is_checked() -> None:
    assert _label_counts("a", {}, 2) is None
    torch.testing.assert_close(_label_counts("a", {"label_counts/counts": torch.tensor([3.5, -1.0])}, 2), torch.tensor([3.5, -1.0]))
    for bad in (torch.ones(3), torch.ones(2, dtype=torch.int64), torch.tensor([1.0, float("nan")])):
        with pytest.raises(ConfigError, match="label_counts/counts"):
            _label_counts("a", {"label_counts/counts": bad}, 2)


def test_cohen_kappa_is_zero_for_constant_or_chance_decisions_and_one_for_agreement() -> None:
    truth = torch.tensor([True, False] * 8)
    assert cohen_kappa(truth, truth).item() == pytest.approx(1.0)
    assert cohen_kappa(torch.ones(16, dtype=torch.bool), truth).item() == pytest.approx(0.0)
    assert cohen_kappa(torch.zeros(16, dtype=torch.bool), truth).item() == pytest.approx(0.0)
    assert cohen_kappa(~truth, truth).item() == pytest.approx(-1.0)
    logits = torch.stack([torch.stack([truth.float(), (~truth).float()], -1), torch.tensor([[5.0, 0.0]]).expand(16, 2)])
    weights = agreement_weights(logits, (~truth).long())
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(normalise_weights(torch.zeros(2, 2), 2), torch.full((2, 2), 0.5))  # nobody follows: equal


def test_agreement_weights_from_one_short_inversion_batch() -> None:
    models = small_cnns(2, seed=3)
    sites = [SiteModel(f"s{i}", m, ClassifierConfig("small-cnn", 1, 2, "batch")) for i, m in enumerate(models)]
    synth = InversionConfig(batch_size=8, steps=2, snapshot_every=1, bn_weight=0.1, num_classes=2)
    import secure_oneshot.server.teacher as teacher

    original = teacher.PROBE_MIN_STEPS
    teacher.PROBE_MIN_STEPS = 2  # keep the test fast: the scheme's shape and bounds, not its quality
    try:
        weights = teacher_weights(sites, "agreement", synth, Execution(device="cpu"))
    finally:
        teacher.PROBE_MIN_STEPS = original
    assert weights is not None and weights.shape == (2, 2)
    assert ((weights >= 0) & (weights <= 1)).all()
    assert teacher_weights(sites, "equal", synth, Execution(device="cpu")) is None
    with pytest.raises(ConfigError, match="label counts"):
        teacher_weights(sites, "label-counts", synth, Execution(device="cpu"))


def test_unknown_weighting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="teacher weighting"):
        DistillJob(teacher_weighting="by-vibes")


def test_the_default_weighting_is_agreement_except_for_the_published_method() -> None:
    assert DistillJob().weighting == "agreement" and DistillJob(preset="gpu").weighting == "agreement"
    assert DistillJob(preset="paper").weighting == "equal"  # the method as published: the plain mean of logits
    assert DistillJob(preset="smoke").weighting == "equal"  # 12 inversion steps: too short for the agreement probe
    assert DistillJob(preset="paper", teacher_weighting="agreement").weighting == "agreement"
    assert DistillJob(teacher_weighting="equal").weighting == "equal"


def test_one_site_is_not_weighed() -> None:
    sites = [SiteModel("only", build_classifier(ClassifierConfig("small-cnn", 1, 2)), ClassifierConfig("small-cnn", 1, 2))]
    synth = InversionConfig(batch_size=4, steps=1, image_size=28, channels=1, num_classes=2)
    assert teacher_weights(sites, "agreement", synth, Execution(device="cpu")) is None  # no probe run for nothing


def test_study_config_takes_the_teacher_weighting() -> None:
    from secure_oneshot.research.experiment import study_from_text

    assert study_from_text('[study]\nname = "w"\n').teacher_weighting is None  # the server preset's default
    assert study_from_text('[study]\nname = "w"\n[server]\nteacher_weighting = "agreement"\n').teacher_weighting == "agreement"
    with pytest.raises(ConfigError, match="server.teacher_weighting"):
        study_from_text('[study]\nname = "w"\n[server]\nteacher_weighting = "by-vibes"\n')


def test_run_distillation_uses_the_default_weighting_and_reports_both_teachers(monkeypatch, tmp_path) -> None:
    """The job as the cpu and gpu presets run it when no scheme is named: agreement weights reach the report, and
    the equal-weight teacher is evaluated beside the weighted one."""
    from torch.utils.data import TensorDataset

    import secure_oneshot.server.study as study
    import secure_oneshot.server.teacher as teacher

    monkeypatch.setattr(teacher, "PROBE_MIN_STEPS", 2)  # the scheme's plumbing, not its quality
    monkeypatch.setitem(study.PRESETS, "tiny", ({"batch_size": 8, "steps": 2, "snapshot_every": 1, "bn_weight": 0.1}, {"epochs": 1}))
    sites = [SiteModel(f"s{i}", m, ClassifierConfig("small-cnn", 1, 2, "batch")) for i, m in enumerate(small_cnns(2, seed=5))]
    test = TensorDataset(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2)
    job = DistillJob(preset="tiny", execution=Execution(device="cpu"))
    assert job.weighting == "agreement"
    run = study.run_distillation(sites, tmp_path / "global", job, test_set=test)
    assert run.report["teacher_weighting"]["scheme"] == "agreement"
    weights = torch.tensor(run.report["teacher_weighting"]["weights"])
    assert weights.shape == (2, 2) and torch.allclose(weights.sum(dim=0), torch.ones(2), atol=1e-3)
    assert {"ensemble (teacher)", "ensemble (equal weights)", "global (distilled)"} <= set(run.metrics)

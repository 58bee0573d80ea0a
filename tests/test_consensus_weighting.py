"""The consensus teacher weighting: sites judged on the server's public (unlabelled) images against the teacher."""

from __future__ import annotations

import pytest
import torch

from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.study import DistillJob, SiteModel, teacher_weights
from secure_oneshot.server.synthesis import InversionConfig
from secure_oneshot.server.weighting import (CONSENSUS_MAX_IMAGES, consensus_weights, default_weighting,
                                             pairwise_agreement, pooled_logits)
from tests.test_teacher_weighting import MeanSign, always_class_0, images


def public_images(n: int = 128) -> torch.Tensor:
    """Unlabelled images of both classes (mean pixel below and above 0), as a public set would hold."""
    return torch.cat([images(n // 2, -1.0, seed=11), images(n // 2, +1.0, seed=12)])


def per_site(models, x: torch.Tensor) -> torch.Tensor:
    return Ensemble(models, batched=False).per_site_logits(x)


def test_a_loud_one_class_site_that_rules_the_equal_teacher_gets_no_weight() -> None:
    good = [MeanSign(4.0, offset=1.0), MeanSign(2.0, offset=-3.0)]
    sites = [*good, always_class_0()]
    logits = per_site(sites, public_images())
    # The equal teacher answers class 0 nearly everywhere (so kappa against it would be 0 for every site) ...
    assert (pooled_logits(logits, None).argmax(-1) == 0).float().mean() > 0.9
    weights = consensus_weights(logits)
    # ... but the pairwise start and the fixed point give the loud site nothing and the good ones nearly everything.
    assert weights[2].abs().max() == 0
    assert (weights[:2] > 0.9).all()
    class_1 = images(64, +1.0)
    weighted = Ensemble(sites, batched=False, weights=weights)(class_1).softmax(-1)
    good_only = Ensemble(good, batched=False)(class_1).softmax(-1)
    assert torch.equal(weighted.argmax(-1), good_only.argmax(-1))
    assert (weighted[:, 1] - good_only[:, 1]).abs().max() < 0.05


def test_a_site_that_decides_against_the_others_gets_no_weight() -> None:
    flipped = MeanSign(-4.0)   # class 1 for a negative mean: wrong on every real image, confident
    sites = [MeanSign(4.0), MeanSign(3.0, offset=2.0), MeanSign(1.0), flipped]
    weights = consensus_weights(per_site(sites, public_images()))
    assert weights[3].max() == 0 and (weights[:3] > 0.9).all()


def test_pooled_logits_are_the_ensembles_teacher() -> None:
    sites = [MeanSign(4.0, offset=1.0), MeanSign(2.0), always_class_0()]
    x = public_images(32)
    logits = per_site(sites, x)
    w = torch.tensor([[0.5, 0.2], [0.5, 0.8], [0.0, 0.0]])
    assert torch.allclose(pooled_logits(logits, None), Ensemble(sites, batched=False)(x), atol=1e-6)
    assert torch.allclose(pooled_logits(logits, w).softmax(-1), Ensemble(sites, batched=False, weights=w)(x).softmax(-1), atol=1e-5)


def test_pairwise_agreement_is_zero_for_a_constant_site_and_one_for_identical_sites() -> None:
    sites = [MeanSign(4.0), MeanSign(2.0), always_class_0()]
    kappa = pairwise_agreement(per_site(sites, public_images()))
    # each good site: kappa 1 with the other good site, 0 with the constant one -> mean 0.5
    assert torch.allclose(kappa[:2], torch.full((2, 2), 0.5)) and kappa[2].max() == 0


def test_consensus_needs_public_images() -> None:
    with pytest.raises(ConfigError, match="public images"):
        DistillJob(teacher_weighting="consensus")
    sites = [SiteModel(f"s{i}", m, ClassifierConfig("small-cnn", 1, 2)) for i, m in enumerate([MeanSign(1.0), MeanSign(2.0)])]
    synth = InversionConfig(batch_size=4, steps=1, image_size=4, channels=1, num_classes=2)
    with pytest.raises(ConfigError, match="public images"):
        teacher_weights(sites, "consensus", synth, Execution(device="cpu"), public=None)


def test_teacher_weights_judge_a_seeded_draw_of_a_large_public_set(monkeypatch) -> None:
    import secure_oneshot.server.teacher as teacher

    monkeypatch.setattr(teacher, "CONSENSUS_MAX_IMAGES", 40)
    seen: list[int] = []
    real = teacher.site_logits
    monkeypatch.setattr(teacher, "site_logits", lambda models, x, execution: seen.append(len(x)) or real(models, x, execution))
    sites = [SiteModel(f"s{i}", m, ClassifierConfig("small-cnn", 1, 2))
             for i, m in enumerate([MeanSign(4.0), MeanSign(2.0), always_class_0()])]
    synth = InversionConfig(batch_size=4, steps=1, image_size=4, channels=1, num_classes=2, seed=5)
    first = teacher_weights(sites, "consensus", synth, Execution(device="cpu"), public=public_images(128))
    again = teacher_weights(sites, "consensus", synth, Execution(device="cpu"), public=public_images(128))
    assert seen == [40, 40] and torch.equal(first, again) and first[2].max() == 0
    assert CONSENSUS_MAX_IMAGES >= 1024   # the shipped bound judges enough images for kappa to settle


def test_the_default_is_consensus_where_the_run_holds_public_images() -> None:
    assert default_weighting("cpu", public_images=True) == "consensus"
    assert default_weighting("cpu") == "agreement"
    assert default_weighting("paper", public_images=True) == "equal"   # the published method stays as published
    assert DistillJob(proxy_images="breastmnist:train").weighting == "consensus"
    assert DistillJob(proxy_images="breastmnist:train", teacher_weighting="agreement").weighting == "agreement"

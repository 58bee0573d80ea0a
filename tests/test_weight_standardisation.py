"""Weight-standardised convolutions (norm "group-ws"): the layer, Opacus's per-record gradients through it, DP training
with it, and the server rebuilding the same model from the released metadata."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from secure_oneshot.client.train import PRESETS, train_classifier
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig, StandardizedConv2d, build_classifier
from secure_oneshot.policy.metadata import review_metadata

from .test_dp_recipe import _tiny_site

torch.set_num_threads(1)


def test_the_convolution_sees_a_standardised_weight_whatever_the_raw_weight_scale_and_shift() -> None:
    torch.manual_seed(0)
    conv = StandardizedConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = conv(x)
        w = conv.weight
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        expected = nn.functional.conv2d(x, (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (var + conv.eps).sqrt(), padding=1)
        assert torch.allclose(out, expected, atol=1e-5)
        conv.weight.mul_(torch.tensor([3.0, 0.5, 7.0, 1.0]).view(4, 1, 1, 1)).add_(torch.tensor([1.0, -2.0, 0.0, 5.0]).view(4, 1, 1, 1))
        assert torch.allclose(conv(x), out, rtol=1e-2, atol=1e-2)      # per-channel scale and shift of the raw weight: no
        #                                                                effect beyond eps's share of the variance
        plain = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        plain.weight.copy_(conv.weight)
        assert not torch.allclose(plain(x), out, atol=1e-2)             # a plain convolution of the same weight differs


def test_group_ws_has_the_tensors_of_group_and_standardises_every_convolution() -> None:
    for architecture in ("small-cnn", "wrn-16-2", "scatternet"):
        ws = build_classifier(ClassifierConfig(architecture, 1, 2, "group-ws"))
        group = build_classifier(ClassifierConfig(architecture, 1, 2, "group"))
        assert {k: v.shape for k, v in ws.state_dict().items()} == {k: v.shape for k, v in group.state_dict().items()}
        convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is StandardizedConv2d for m in convs)
    with pytest.raises(ValueError, match="norm must be one of"):
        build_classifier(ClassifierConfig("small-cnn", 1, 2, "batch-ws"))


def test_opacus_per_record_gradients_go_through_the_standardisation() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(1)
    model = build_classifier(ClassifierConfig("small-cnn", 1, 2, "group-ws"))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    wrapped = GradSampleModule(model, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the full-backward-hook notice for the first layer
        nn.functional.cross_entropy(wrapped(x), y, reduction="sum").backward()
    per_record = model.features[0].weight.grad_sample
    for i in range(4):
        single = build_classifier(ClassifierConfig("small-cnn", 1, 2, "group-ws"))
        single.load_state_dict(model.state_dict())
        nn.functional.cross_entropy(single(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        assert torch.allclose(per_record[i], single.features[0].weight.grad, atol=1e-5)


def test_dp_training_with_weight_standardisation_is_recorded_and_costs_no_epsilon() -> None:
    data = _tiny_site()
    base = replace(PRESETS["dp"], epochs=1, dp_epsilon=8.0, label_counts_epsilon=None, max_physical_batch_size=16, accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = train_classifier(ClassifierConfig("small-cnn", 1, 2), replace(base, weight_standardisation=True), data)
        plain = train_classifier(ClassifierConfig("small-cnn", 1, 2), base, data)
    assert ws.model_config.norm == "group-ws" and plain.model_config.norm == "group"
    assert any(type(m) is StandardizedConv2d for m in ws.model.modules())
    assert ws.dp is not None and plain.dp is not None and ws.dp.history == plain.dp.history and ws.dp.epsilon == plain.dp.epsilon
    # what the server rebuilds from the released metadata computes what the site trained
    described = {"classifier": {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2, "norm": "group-ws"}}
    assert not review_metadata(described, "h1", {"classifier"}).refused
    described["classifier"]["norm"] = "group-xx"
    assert [f.path for f in review_metadata(described, "h1", {"classifier"}).refused] == ["artifacts.classifier.norm"]
    rebuilt = build_classifier(ws.model_config).eval()
    rebuilt.load_state_dict(ws.model.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ws.model.eval()(x))
    with pytest.raises(ConfigError, match="weight_standardisation goes with DP"):
        train_classifier(ClassifierConfig("small-cnn", 1, 2), replace(PRESETS["cpu"], epochs=1, weight_standardisation=True), data)


def test_studies_cached_before_the_option_keep_their_site_cache_keys() -> None:
    from secure_oneshot.research import experiment

    study = experiment.study_from_text('[study]\nname = "k"\n[site]\nepsilons = [8.0]\n')
    cfg, preset = experiment._site_setup(study, study.cells()[0], None)
    assert not preset.dp_train.weight_standardisation
    key = experiment._cache_key(cfg, preset)
    assert "weight_standardisation" not in experiment._train_key(preset.dp_train)
    assert key != experiment._cache_key(cfg, replace(preset, dp_train=replace(preset.dp_train, weight_standardisation=True)))

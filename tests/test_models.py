"""Classifier registry: torchvision's computation, and every architecture trains under Opacus DP."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18 as torchvision_resnet18

from secure_oneshot.models.classifier import ARCHITECTURES, ClassifierConfig, build_classifier, has_batchnorm


def test_resnet18_computes_exactly_what_torchvision_does() -> None:
    torch.manual_seed(0)
    ours = build_classifier(ClassifierConfig("resnet18", 3, 10)).eval()
    reference = torchvision_resnet18(weights=None, num_classes=10).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels, classes", [(1, 2), (3, 8)])
def test_shapes_and_norms(architecture: str, channels: int, classes: int) -> None:
    size = 64 if architecture == "resnet18" else 28
    for norm in ("batch", "group"):
        model = build_classifier(ClassifierConfig(architecture, channels, classes, norm))
        assert model(torch.randn(2, channels, size, size)).shape == (2, classes)
        assert has_batchnorm(model) == (norm == "batch")


@pytest.mark.parametrize("architecture", ["resnet18-cifar", "small-cnn"])
def test_dp_step_runs_with_opacus_hooks(architecture: str) -> None:
    """Regression: torchvision's in-place ReLU and residual add broke Opacus's backward hooks on ResNet-18."""
    from opacus import PrivacyEngine

    model = build_classifier(ClassifierConfig(architecture, norm="group"))
    data = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.arange(8) % 2), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, data = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
            noise_multiplier=1.0, max_grad_norm=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        for x, y in data:
            optimizer.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("architecture", ["small-cnn", "resnet18-cifar"])
def test_opacus_fix_matches_what_the_server_rebuilds(architecture: str) -> None:
    """Sites fix BatchNorm with Opacus; the server rebuilds with norm="group": same names, shapes and outputs."""
    from secure_oneshot.client.train import _fix_for_dp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = _fix_for_dp(build_classifier(ClassifierConfig(architecture))).eval()
    rebuilt = build_classifier(ClassifierConfig(architecture, norm="group")).eval()
    rebuilt.load_state_dict(fixed.state_dict())  # strict
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(fixed(x), rebuilt(x), atol=1e-6)

"""The plain-Python classifier layouts (models.specs) equal what the real modules define (models.describe)."""

from __future__ import annotations

import pytest

from secure_oneshot.models.specs import CLASSIFIER_ARCHITECTURES, classifier_layout

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from secure_oneshot.models.classifier import ARCHITECTURES, ClassifierConfig  # noqa: E402
from secure_oneshot.models.describe import describe_classifier, feature_layers  # noqa: E402

CODES = {torch.float32: "F32", torch.int64: "I64"}


def test_every_architecture_has_a_layout() -> None:
    assert sorted(CLASSIFIER_ARCHITECTURES) == sorted(ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(CLASSIFIER_ARCHITECTURES))
@pytest.mark.parametrize("norm", ["batch", "group", "group-ws"])
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 2), (3, 9), (2, 1)])
def test_layout_matches_the_module(architecture: str, norm: str, in_channels: int, num_classes: int) -> None:
    cfg = ClassifierConfig(architecture, in_channels, num_classes, norm)
    real = {name: (spec.shape, CODES[spec.dtype], spec.role) for name, spec in describe_classifier(cfg).items()}
    layout = classifier_layout(architecture, in_channels, num_classes, norm)
    assert {name: (e.shape, e.dtype, e.role) for name, e in layout.entries.items()} == real
    assert layout.norm_layers == feature_layers(cfg)


@pytest.mark.parametrize(("args", "message"), [
    (("vgg", 1, 2, "batch"), "unknown architecture"),
    (("small-cnn", 1, 2, "layer"), "norm"),
    (("small-cnn", 0, 2, "batch"), "in_channels"),
    (("small-cnn", 1, True, "batch"), "num_classes"),
])
def test_bad_configs_are_value_errors(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classifier_layout(*args)

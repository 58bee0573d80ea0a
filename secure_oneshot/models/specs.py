"""Classifier tensor layouts in plain Python: every state-dict entry an architecture defines, without PyTorch.

The export gate and the server's ingest classify tensors by the declared
architecture's structure (:mod:`secure_oneshot.policy.structure`).  Those are
transfer-path commands, which import no ML library, so the classifier layouts
are written out here layer by layer instead of building the model on the meta
device.  ``tests/test_architecture_specs.py`` checks that every architecture,
in both norms and several channel/class counts, gives exactly the entries
(name, shape, dtype, role) and normalisation layers of
:func:`secure_oneshot.models.describe.describe_classifier` and
:func:`~secure_oneshot.models.describe.feature_layers`, which build the real
module.

Dtypes are safetensors codes (``"F32"``, ``"I64"``); roles are those of
:mod:`secure_oneshot.models.describe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

__all__ = ["ClassifierLayout", "LayoutEntry", "CLASSIFIER_ARCHITECTURES", "classifier_layout"]

CLASSIFIER_ARCHITECTURES = ("resnet18", "resnet18-cifar", "scatternet", "small-cnn")
SCATTERING_CHANNELS = 81    # per input channel: models.scatternet.SCATTERING_CHANNELS (J=2, L=8)
_SCATTERING_GROUPS = 27
_SCATTERNET_WIDTH = 64


@dataclass(frozen=True)
class LayoutEntry:
    """One state-dict entry: shape, safetensors dtype code, role."""

    shape: tuple[int, ...]
    dtype: str
    role: str   # "parameter" | "bn_statistics" | "buffer" | "statistic"


@dataclass
class ClassifierLayout:
    """Entries by state-dict name, and the normalisation layers (name -> channels) in module order."""

    entries: dict[str, LayoutEntry] = field(default_factory=dict)
    norm_layers: dict[str, int] = field(default_factory=dict)

    def conv(self, name: str, c_in: int, c_out: int, kernel: int) -> None:
        self.entries[f"{name}.weight"] = LayoutEntry((c_out, c_in, kernel, kernel), "F32", "parameter")   # bias=False throughout

    def linear(self, name: str, c_in: int, c_out: int) -> None:
        self.entries[f"{name}.weight"] = LayoutEntry((c_out, c_in), "F32", "parameter")
        self.entries[f"{name}.bias"] = LayoutEntry((c_out,), "F32", "parameter")

    def norm(self, name: str, channels: int, kind: str, groups: int | None = None) -> None:
        """BatchNorm2d (``kind="batch"``) or GroupNorm(``groups`` or min(32, channels)), both affine."""
        if kind == "group" and channels % (groups or min(32, channels)):
            raise ValueError(f"{channels} channels do not split into {groups or min(32, channels)} groups")
        self.entries[f"{name}.weight"] = LayoutEntry((channels,), "F32", "parameter")
        self.entries[f"{name}.bias"] = LayoutEntry((channels,), "F32", "parameter")
        if kind == "batch":
            self.entries[f"{name}.running_mean"] = LayoutEntry((channels,), "F32", "bn_statistics")
            self.entries[f"{name}.running_var"] = LayoutEntry((channels,), "F32", "bn_statistics")
            self.entries[f"{name}.num_batches_tracked"] = LayoutEntry((), "I64", "bn_statistics")
        self.norm_layers[name] = channels


def _small_cnn(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str) -> None:
    widths = (in_channels, 32, 64, 128)
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):   # conv, norm, relu, pool per stage
        layout.conv(f"features.{4 * i}", c_in, c_out, 3)
        layout.norm(f"features.{4 * i + 1}", c_out, norm)
    layout.linear("head", widths[-1], num_classes)


def _resnet18(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str, stem_kernel: int) -> None:
    """torchvision's ResNet-18: [2, 2, 2, 2] basic blocks; a 1x1 downsample where the width or stride changes."""
    layout.conv("conv1", in_channels, 64, stem_kernel)
    layout.norm("bn1", 64, norm)
    planes_in = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            layout.conv(f"{prefix}.conv1", planes_in, planes, 3)
            layout.norm(f"{prefix}.bn1", planes, norm)
            layout.conv(f"{prefix}.conv2", planes, planes, 3)
            layout.norm(f"{prefix}.bn2", planes, norm)
            if block == 0 and (stage > 1 or planes_in != planes):
                layout.conv(f"{prefix}.downsample.0", planes_in, planes, 1)
                layout.norm(f"{prefix}.downsample.1", planes, norm)
            planes_in = planes
    layout.linear("fc", 512, num_classes)


def _scatternet(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str) -> None:
    channels = in_channels * SCATTERING_CHANNELS
    layout.norm("scattering_norm", channels, "group", _SCATTERING_GROUPS)   # the fixed front end has no state
    layout.conv("features.0", channels, _SCATTERNET_WIDTH, 3)
    layout.norm("features.1", _SCATTERNET_WIDTH, norm)
    layout.conv("features.4", _SCATTERNET_WIDTH, _SCATTERNET_WIDTH, 3)
    layout.norm("features.5", _SCATTERNET_WIDTH, norm)
    layout.linear("head", _SCATTERNET_WIDTH, num_classes)


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


@lru_cache(maxsize=64)
def classifier_layout(architecture: str, in_channels: int, num_classes: int, norm: str = "batch") -> ClassifierLayout:
    """The layout of ``models.classifier.build_classifier(ClassifierConfig(...))``.

    Raises:
        ValueError: unknown architecture or norm, or a channel / class count that is not a positive integer.
    """
    if architecture not in CLASSIFIER_ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(CLASSIFIER_ARCHITECTURES)}")
    if norm not in ("batch", "group"):
        raise ValueError("norm must be 'batch' or 'group'")
    in_channels, num_classes = _positive("in_channels", in_channels), _positive("num_classes", num_classes)
    layout = ClassifierLayout()
    if architecture == "small-cnn":
        _small_cnn(layout, in_channels, num_classes, norm)
    elif architecture == "scatternet":
        _scatternet(layout, in_channels, num_classes, norm)
    else:
        _resnet18(layout, in_channels, num_classes, norm, 3 if architecture == "resnet18-cifar" else 7)
    return layout

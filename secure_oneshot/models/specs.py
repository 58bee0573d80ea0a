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

__all__ = ["NORMS", "ClassifierLayout", "LayoutEntry", "CLASSIFIER_ARCHITECTURES", "classifier_layout", "default_architecture", "config_default_architecture"]

NORMS = ("batch", "group", "group-ws")
"""Classifier normalisations: BatchNorm, GroupNorm (what Opacus's fix makes of BatchNorm), GroupNorm with
weight-standardised convolutions (models.classifier.StandardizedConv2d)."""
CLASSIFIER_ARCHITECTURES = ("resnet18", "resnet18-cifar", "resnet34", "resnet34-cifar", "scatternet", "small-cnn",
                            "vgg11-bn", "wrn-16-2")
# Shared with models.classifier, which builds the modules from the same numbers.
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}     # basic blocks per stage (torchvision)
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)  # torchvision's cfg "A", last pool dropped
WRN_WIDTHS = (16, 32, 64, 128)   # WRN-16-2: the stem, then 16 k, 32 k, 64 k with k = 2
WRN_BLOCKS = 2                   # (16 - 4) / 6 blocks per group
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

    def conv(self, name: str, c_in: int, c_out: int, kernel: int, bias: bool = False) -> None:
        self.entries[f"{name}.weight"] = LayoutEntry((c_out, c_in, kernel, kernel), "F32", "parameter")
        if bias:   # only VGG's convolutions have one
            self.entries[f"{name}.bias"] = LayoutEntry((c_out,), "F32", "parameter")

    def linear(self, name: str, c_in: int, c_out: int) -> None:
        self.entries[f"{name}.weight"] = LayoutEntry((c_out, c_in), "F32", "parameter")
        self.entries[f"{name}.bias"] = LayoutEntry((c_out,), "F32", "parameter")

    def norm(self, name: str, channels: int, kind: str, groups: int | None = None) -> None:
        """BatchNorm2d (``kind="batch"``) or GroupNorm(``groups`` or min(32, channels)), both affine.

        ``"group-ws"`` lays out as ``"group"``: weight standardisation changes the forward pass, not the tensors."""
        if kind != "batch" and channels % (groups or min(32, channels)):
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


def _resnet(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str, stem_kernel: int,
            blocks: tuple[int, ...]) -> None:
    """torchvision's ResNet-18/34: basic blocks per stage; a 1x1 downsample where the width or stride changes."""
    layout.conv("conv1", in_channels, 64, stem_kernel)
    layout.norm("bn1", 64, norm)
    planes_in = 64
    for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for block in range(count):
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


def _vgg11_bn(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str) -> None:
    """conv(bias)-norm-relu per width, a max pool per "M" (Sequential indices count every module), linear head."""
    index, c_in = 0, in_channels
    for v in VGG11_LAYERS:
        if v == "M":
            index += 1
            continue
        layout.conv(f"features.{index}", c_in, int(v), 3, bias=True)
        layout.norm(f"features.{index + 1}", int(v), norm)
        index, c_in = index + 3, int(v)
    layout.linear("classifier", c_in, num_classes)


def _wrn(layout: ClassifierLayout, in_channels: int, num_classes: int, norm: str) -> None:
    """WRN-16-2: pre-activation blocks (bn1, conv1, bn2, conv2, a 1x1 shortcut where the shape changes), final norm."""
    layout.conv("conv1", in_channels, WRN_WIDTHS[0], 3)
    for group, (c_in, c_out) in enumerate(zip(WRN_WIDTHS, WRN_WIDTHS[1:]), start=1):
        for block in range(WRN_BLOCKS):
            prefix, first = f"block{group}.{block}", block == 0
            width_in = c_in if first else c_out
            layout.norm(f"{prefix}.bn1", width_in, norm)
            layout.conv(f"{prefix}.conv1", width_in, c_out, 3)
            layout.norm(f"{prefix}.bn2", c_out, norm)
            layout.conv(f"{prefix}.conv2", c_out, c_out, 3)
            if first and (c_in != c_out or group > 1):
                layout.conv(f"{prefix}.shortcut", c_in, c_out, 1)
    layout.norm("bn", WRN_WIDTHS[-1], norm)
    layout.linear("fc", WRN_WIDTHS[-1], num_classes)


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
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}")
    in_channels, num_classes = _positive("in_channels", in_channels), _positive("num_classes", num_classes)
    layout = ClassifierLayout()
    if architecture == "small-cnn":
        _small_cnn(layout, in_channels, num_classes, norm)
    elif architecture == "scatternet":
        _scatternet(layout, in_channels, num_classes, norm)
    elif architecture == "vgg11-bn":
        _vgg11_bn(layout, in_channels, num_classes, norm)
    elif architecture == "wrn-16-2":
        _wrn(layout, in_channels, num_classes, norm)
    else:
        depth = architecture.removesuffix("-cifar")
        _resnet(layout, in_channels, num_classes, norm, 3 if architecture.endswith("-cifar") else 7, RESNET_BLOCKS[depth])
    return layout


def default_architecture(image_size: int) -> str:
    """The method's classifier for a MedMNIST+ size.

    ResNet-18 throughout, as the method: the CIFAR-style stem (3x3, stride 1, no max pool) where the images are
    small (28 and 64 px), torchvision's ImageNet stem (7x7, stride 2, max pool) at 128 and 224 px, the method's
    224 px setting.

    Raises:
        ValueError: a size that is not a positive integer.
    """
    return "resnet18-cifar" if _positive("image_size", image_size) <= 64 else "resnet18"


def config_default_architecture(image_size: int) -> str:
    """The classifier a site trains when its configuration names none.

    ``small-cnn`` at 28 px: the model the ``cpu`` and ``dp`` training presets were measured with (a ResNet-18 at
    28 px takes many times its CPU time for the same records).  Larger images need the depth and the downsampling
    of a ResNet, so above 28 px it is :func:`default_architecture` (the ImageNet stem at 128 and 224 px).

    Raises:
        ValueError: a size that is not a positive integer.
    """
    return "small-cnn" if _positive("image_size", image_size) <= 28 else default_architecture(image_size)

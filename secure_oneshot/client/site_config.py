"""The site config file (``site.toml``) for ``secure-oneshot train``: strict, every problem with file:line.

::

    [data]
    source = "medmnist"          # or "folder" | "manifest" | "dicom": the site's own images (see below)
    flag = "pneumoniamnist"      # any 2D MedMNIST flag
    size = 28
    root = "../shared/data/medmnist"   # optional; else --data-root or $SECURE_ONESHOT_DATA
    # file = "my-site.npz"      # a site's own MedMNIST-format file instead of a partition
    site = 0                     # which part of the partition this site is (simulations)
    n_sites = 5
    partition = "iid"            # or "dirichlet"
    alpha = 0.6
    partition_seed = 0
    min_size = 10

    # A site's own images instead (README "Bring your own data"); partition keys do not apply:
    # source = "folder"            # root/<class name>/*.png|jpg|jpeg|tif|tiff
    # root = "images"
    # source = "manifest"          # or "dicom": a CSV of path,label rows, paths relative to the CSV's folder
    # manifest = "images/manifest.csv"
    # path_column = "path"
    # label_column = "label"
    # classes = ["normal", "pneumonia"]   # the label map: index i is classes[i], the same at every site
    # label_columns = ["effusion", "nodule"]   # multi-label manifests instead: one 0/1 column per label (no classes)
    # channels = 1                 # 1: grey, 3: RGB
    # size = 28                    # images are centre-cropped to a square and resized to this

    [model]
    architecture = "small-cnn"   # resnet18-cifar | resnet18 | resnet34(-cifar) | vgg11-bn | wrn-16-2 | small-cnn | scatternet
                                 # omitted: small-cnn at 28 px, resnet18-cifar at 64 px, resnet18 (ImageNet stem) at 128/224 px

    [train]
    preset = "dp"                # cpu | dp | fedisca (default: dp with dp_epsilon, else cpu); fields below override it
    dp_epsilon = 8.0             # omit for non-private training
    label_counts_epsilon = 0.1   # optional: release a DP label histogram (artifact label_counts); 0 or absent: none
    threshold_epsilon = 0.8      # optional, DP binary tasks: measure a balanced decision threshold with this budget
    loss = "auto"                # "ce" | "logit-adjusted" | "auto" (logit-adjusted under DP with a histogram)
    # logit_adjust_tau = 4.0     # optional; default 4 under DP (measured), 1 without

    [generator]                  # optional: a class-conditional diffusion generator
    preset = "cpu-small"
    epochs = 3
    dp_epsilon = 8.0             # optional
    samples = 32                 # optional: write generator_samples.png to check it

    [feature_stats]              # optional, DP classifiers only: DP per-layer feature statistics
    epsilon = 1.0

    [output]
    dir = "site-0/model"
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .._internal.compat import tomllib
from .._internal.strict_toml import Problems, Table, one_of, positive
from ..data import Partition
from ..data.image_files import SourceConfig
from ..data.source_config import SIZES, int_in, own_source
from ..errors import ConfigError
from ..models.classifier import ARCHITECTURES, ClassifierConfig
from ..models.specs import config_default_architecture
from .train import LOSSES, PRESETS, DataConfig, TrainConfig

__all__ = ["SiteConfig", "load_site_config", "site_config_from_text", "default_preset", "with_dp"]


@dataclass(frozen=True)
class SiteConfig:
    data: DataConfig
    model: ClassifierConfig
    train: TrainConfig
    generator: dict[str, Any] | None
    feature_stats: dict[str, Any] | None
    out: Path
    train_preset: str | None = None                                     # as named in [train]; None: the default
    train_overrides: dict[str, Any] = field(default_factory=dict)      # [train] settings over the preset
    source: SourceConfig | None = None                                  # the site's own images; None: MedMNIST (data)


# TrainConfig field -> TOML type ("from __future__ import annotations" makes field types strings).
_TRAIN_KINDS = {"int": "integer", "float": "number", "float | None": "number", "bool": "boolean", "str": "string",
                "tuple[float, ...]": "list of numbers"}


def default_preset(dp: bool) -> str:
    """The training preset when the config names none: ``dp`` (tuned for DP-SGD) when DP is on, else ``cpu``."""
    return "dp" if dp else "cpu"


def _train_config(t: Table) -> tuple[TrainConfig, str | None, dict[str, Any]]:
    preset = t.get("preset", "string", None, check=one_of(tuple(PRESETS)))
    overrides: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name in t.data:
            overrides[f.name] = t.get(f.name, _TRAIN_KINDS[str(f.type)])
    t.finish()
    if overrides.get("milestones") is not None:
        overrides["milestones"] = tuple(overrides["milestones"])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    name = preset or default_preset(overrides.get("dp_epsilon") is not None)
    return replace(PRESETS.get(name, PRESETS["cpu"]), **overrides), preset, overrides


def with_dp(cfg: SiteConfig, epsilon: float, delta: float) -> SiteConfig:
    """``cfg`` trained with DP-SGD at ``(epsilon, delta)``: a config that named no preset switches to the ``dp`` preset
    (its own settings still override it), as if it had said ``dp_epsilon`` itself."""
    base = PRESETS[cfg.train_preset or default_preset(True)]
    return replace(cfg, train=replace(base, **{**cfg.train_overrides, "dp_epsilon": epsilon, "dp_delta": delta}))


def _data_config(t: Table, root_override: str | None, problems: Problems) -> tuple[DataConfig, SourceConfig | None]:
    source = own_source(t, problems, root_override)
    if source is not None:
        config = DataConfig(size=source.size, site=t.get("site", "integer", 0))
        t.finish()
        return config, source
    partition = Partition(
        n_sites=t.get("n_sites", "integer", 5, check=positive),
        scheme=t.get("partition", "string", "iid", check=one_of(("iid", "dirichlet"))),
        alpha=t.get("alpha", "number", 0.6, check=positive),
        seed=t.get("partition_seed", "integer", 0),
        min_size=t.get("min_size", "integer", 10, check=positive),
    )
    config = DataConfig(
        flag=t.get("flag", "string", "pneumoniamnist"),
        size=t.get("size", "integer", 28, check=int_in(SIZES)),
        root=root_override or t.get("root", "string", None),
        file=t.get("file", "string", None),
        site=t.get("site", "integer", 0),
        partition=partition,
    )
    t.finish()
    return config, None


def _optional_table(root: Table, name: str, allowed: dict[str, str]) -> dict[str, Any] | None:
    if name not in root.data:
        root.read.add(name)
        return None
    t = root.table(name)
    values = {key: t.get(key, kind, None) for key, kind in allowed.items()}
    t.finish()
    return {k: v for k, v in values.items() if v is not None}


def site_config_from_text(text: str, source: str = "<site config>", *, root_override: str | None = None) -> SiteConfig:
    """Parse a site config.  Raises ``ConfigError`` listing every problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})") from e
    problems = Problems(source, text, "see the site.toml example in secure_oneshot/client/site_config.py")
    root = Table(doc, "", problems)
    data, source = _data_config(root.table("data", required=False), root_override, problems)
    model_t = root.table("model", required=False)
    # A config that names no architecture gets the one for its image size (small-cnn at 28 px, ResNet-18 above).
    architecture = model_t.get("architecture", "string", None, check=one_of(tuple(ARCHITECTURES))) or config_default_architecture(data.size)
    model_t.finish()
    train, train_preset, train_overrides = _train_config(root.table("train", required=False))
    generator = _optional_table(root, "generator", {"preset": "string", "epochs": "integer", "batch_size": "integer", "lr": "number",
                                                   "dp_epsilon": "number", "dp_delta": "number", "samples": "integer"})
    stats = _optional_table(root, "feature_stats", {"epsilon": "number", "delta": "number", "clip_norm": "number"})
    output = root.table("output", required=False)
    out = output.get("dir", "string", "model")
    output.finish()
    root.finish()
    if train.dp_epsilon is not None and not train.dp_epsilon > 0:
        problems.add("train.dp_epsilon", "must be positive")
    if train.label_counts_epsilon is not None and not train.label_counts_epsilon >= 0:
        problems.add("train.label_counts_epsilon", "must be positive (0: no label histogram)")
    if train.label_counts_epsilon and train.dp_epsilon is not None and train.label_counts_epsilon >= train.dp_epsilon:
        problems.add("train.label_counts_epsilon", "must be below train.dp_epsilon (the histogram's budget is taken out of it)")
    if train.logit_adjust_tau is not None and not train.logit_adjust_tau > 0:
        problems.add("train.logit_adjust_tau", "must be positive")
    if train.loss not in LOSSES:
        problems.add("train.loss", f"must be one of {list(LOSSES)}")
    elif train.loss == "logit-adjusted" and train.dp_epsilon is not None and not train.label_counts_epsilon:
        problems.add("train.loss", "logit-adjusted under DP needs train.label_counts_epsilon (the prior must be a DP release)")
    problems.raise_if_any()
    return SiteConfig(data, ClassifierConfig(architecture), train, generator, stats, Path(out), train_preset, train_overrides, source)


def load_site_config(path: str | os.PathLike[str], *, root_override: str | None = None) -> SiteConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read site config {path}: {e.strerror}") from e
    return site_config_from_text(text, str(path), root_override=root_override)



"""The site's image generator: a class-conditional DDPM UNet (diffusers), built from a frozen config.

This module only *builds* things: the UNet (:func:`build_generator`) and the
noise schedule's configuration (:func:`scheduler_config`).  Training, sampling
and (de)serialisation live in :mod:`secure_oneshot.client.generator`; nothing
here touches disk or downloads weights (no ``from_pretrained``).

Decisions worth knowing:

* **Image size and padding.**  ``UNet2DModel`` halves the resolution in every
  down block but the last (stride-2 conv) and doubles it back with nearest
  upsampling, without an explicit output size.  So the size it runs at must be
  divisible by ``2 ** (levels - 1)``.  28 px is divisible by 4: two or three
  levels (28 -> 14 -> 7) run unpadded; four levels run at 32 px.
  :func:`padded_size` gives that size; the client pads the training images
  (``pad_mode``, default ``"reflect"``: the border continues the image instead of
  adding a hard edge) and crops samples back to ``image_size``.  The crop size
  is recorded in the model's config as ``image_size`` so that a sampler needs
  only the model.
* **Class conditioning** uses ``num_class_embeds``: an ``nn.Embedding`` added to
  the timestep embedding (per sample, so Opacus can clip it per sample).
* **DP.**  The UNet has GroupNorm only (no BatchNorm), so Opacus's
  ``ModuleValidator`` accepts it unchanged, attention blocks included.  Opacus's
  fast ("hooks") per-sample gradients are wrong for the convs after an attention
  block unless their inputs are made contiguous, which the client's DP training
  does (see ``secure_oneshot.client.generator.contiguous_conv_inputs``).
* **The CPU preset has no attention**: within a few CPU minutes more epochs buy
  more than attention does.  Measured on one CPU thread, 1000 images: attention
  at 7 px plus the bottleneck adds 15% per epoch; also at 14 px, 75%.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import DDPMScheduler, UNet2DModel

from ..errors import ConfigError

__all__ = ["GeneratorConfig", "PRESETS", "BETA_SCHEDULES", "PAD_MODES", "build_generator", "padded_size",
           "scheduler_config"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""Noise schedules accepted (diffusers' ``DDPMScheduler`` names)."""

PAD_MODES = ("reflect", "replicate", "constant")
"""``torch.nn.functional.pad`` modes for padding images up to :func:`padded_size` (constant pads with -1, black)."""


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture and noise schedule of a site's generator.

    Raises:
        ConfigError: a field is out of range or inconsistent (e.g. a channel
            count the GroupNorm groups do not divide).
    """

    image_size: int = 28                         # data's height = width, in pixels
    in_channels: int = 1                         # 1 (grey) or 3 (RGB); the UNet predicts as many
    num_classes: int = 2                         # class-conditional: one embedding per label
    block_out_channels: tuple[int, ...] = (32, 64)   # one entry per resolution level
    layers_per_block: int = 1                    # ResNet blocks per down level (up levels get one more)
    norm_num_groups: int = 8                     # GroupNorm groups; must divide every channel count
    num_train_timesteps: int = 1000
    attention_levels: tuple[int, ...] = ()       # resolution levels (0 = full size) with self-attention
    mid_attention: bool = False                  # self-attention in the bottleneck block
    attention_head_dim: int = 8
    dropout: float = 0.0
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    clip_sample: bool = True                     # clip predicted x0 to [-1, 1] while sampling
    pad_mode: str = "reflect"                    # see PAD_MODES and the module docstring

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "attention_levels"):  # TOML gives lists; keep the config hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid generator config: " + "; ".join(problems),
                              hint="see secure_oneshot.models.generator.GeneratorConfig for each field's meaning")


def _int_problems(cfg: GeneratorConfig) -> list[str]:
    minimum = {"image_size": 4, "in_channels": 1, "num_classes": 1, "layers_per_block": 1, "norm_num_groups": 1,
               "num_train_timesteps": 2, "attention_head_dim": 1}
    return [f"{name} must be an integer >= {low}, got {getattr(cfg, name)!r}" for name, low in minimum.items()
            if isinstance(getattr(cfg, name), bool) or not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < low]


def _channel_problems(cfg: GeneratorConfig) -> list[str]:
    channels, groups = cfg.block_out_channels, cfg.norm_num_groups
    if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
        return [f"block_out_channels must be one or more positive integers, got {channels!r}"]
    problems = []
    if isinstance(groups, int) and groups > 0 and any(c % groups for c in channels):
        problems.append(f"norm_num_groups {groups} must divide every block_out_channels entry, got {channels}")
    if any(level not in range(len(channels)) for level in cfg.attention_levels):
        problems.append(f"attention_levels must be in 0..{len(channels) - 1}, got {cfg.attention_levels}")
    return problems


def _schedule_problems(cfg: GeneratorConfig) -> list[str]:
    problems = []
    if cfg.beta_schedule not in BETA_SCHEDULES:
        problems.append(f"beta_schedule must be one of {list(BETA_SCHEDULES)}, got {cfg.beta_schedule!r}")
    if not 0.0 < cfg.beta_start < cfg.beta_end < 1.0:
        problems.append(f"need 0 < beta_start < beta_end < 1, got {cfg.beta_start!r}, {cfg.beta_end!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.pad_mode not in PAD_MODES:
        problems.append(f"pad_mode must be one of {list(PAD_MODES)}, got {cfg.pad_mode!r}")
    return problems


def _problems(cfg: GeneratorConfig) -> list[str]:
    """Every problem at once (collect, then fail once), so one edit fixes a config file."""
    problems = _int_problems(cfg) + _channel_problems(cfg) + _schedule_problems(cfg)
    if not problems and cfg.pad_mode == "reflect" and padded_size(cfg) - cfg.image_size >= cfg.image_size:
        problems.append(f"reflect padding cannot grow {cfg.image_size} px to {padded_size(cfg)} px; use fewer levels")
    return problems


def padded_size(cfg: GeneratorConfig) -> int:
    """The square size the UNet runs at: ``image_size`` rounded up to a multiple of ``2 ** (levels - 1)``."""
    step = 2 ** (len(cfg.block_out_channels) - 1)
    return -(-cfg.image_size // step) * step


PRESETS: dict[str, GeneratorConfig] = {
    # 2.5 M parameters; on 2 CPU cores one epoch of 1000 images at 28 px takes about 6 s (22 s with DP). No attention.
    "cpu-small": GeneratorConfig(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8),
    # 15.7 M parameters, for one GPU: the usual small-image DDPM shape; attention at 7 px and in the bottleneck.
    "gpu": GeneratorConfig(block_out_channels=(64, 128, 256), layers_per_block=2, norm_num_groups=32,
                           attention_levels=(2,), mid_attention=True, dropout=0.1),
}
"""Named configs; replace single fields with ``dataclasses.replace(PRESETS[name], in_channels=3)``."""


def _block_types(cfg: GeneratorConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down block types from full size down, up block types from the bottleneck up."""
    levels = range(len(cfg.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    return down, up


def build_generator(cfg: GeneratorConfig) -> UNet2DModel:
    """A freshly initialised class-conditional UNet (uses the global torch RNG for its weights).

    Args:
        cfg: the architecture.

    Returns:
        A ``UNet2DModel`` running at :func:`padded_size` pixels whose config also
        holds ``image_size`` (the size samples are cropped to).

    >>> model = build_generator(PRESETS["cpu-small"])
    >>> model.config.sample_size, model.config.image_size
    (28, 28)
    """
    down, up = _block_types(cfg)
    model = UNet2DModel(
        sample_size=padded_size(cfg), in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=cfg.block_out_channels, down_block_types=down, up_block_types=up,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim, add_attention=cfg.mid_attention, dropout=cfg.dropout,
        num_class_embeds=cfg.num_classes, num_train_timesteps=cfg.num_train_timesteps,
    )
    model.register_to_config(image_size=cfg.image_size)  # the crop target, for samplers that get only the model
    return model


def scheduler_config(cfg: GeneratorConfig) -> dict[str, Any]:
    """The training noise schedule as plain data (``DDPMScheduler.from_config`` rebuilds it).

    Private diffusers keys (``_class_name``, ``_use_default_values``, ...) are left
    out: they describe the library, not the schedule.

    Args:
        cfg: the generator config.

    Returns:
        A dict of str/int/float/bool/None values (epsilon prediction).
    """
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                              beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=cfg.clip_sample,
                              prediction_type="epsilon")
    return {key: value for key, value in dict(scheduler.config).items() if not key.startswith("_")}


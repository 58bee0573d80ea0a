"""Model directories whose tensors are what their declared architecture defines (as `secure-oneshot train` writes them)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.policy.dp import DpRecord

TINY_GENERATOR = {"image_size": 8, "in_channels": 1, "num_classes": 2, "block_out_channels": [8], "layers_per_block": 1,
                  "norm_num_groups": 4, "num_train_timesteps": 10, "attention_levels": [], "mid_attention": False,
                  "attention_head_dim": 8, "dropout": 0.0, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                  "clip_sample": True, "pad_mode": "reflect"}


def classifier_state(norm: str = "batch", seed: int = 0) -> tuple[dict[str, torch.Tensor], ClassifierConfig]:
    torch.manual_seed(seed)
    cfg = ClassifierConfig("small-cnn", 1, 2, norm)
    model = build_classifier(cfg)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, cfg


def generator_state() -> dict[str, torch.Tensor]:
    from secure_oneshot.models.generator import GeneratorConfig, build_generator

    cfg = GeneratorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_GENERATOR.items()})
    return {k: v.detach().clone().contiguous() for k, v in build_generator(cfg).state_dict().items()}


def feature_stats_state(norm: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    from secure_oneshot.models.describe import feature_layers

    layers = feature_layers(ClassifierConfig("small-cnn", 1, 2, norm))
    tensors = {}
    for layer, channels in layers.items():
        tensors[f"{layer}.mean"], tensors[f"{layer}.var"] = torch.zeros(channels), torch.ones(channels)
    return tensors, sorted(layers)


def make_real_model_dir(root: Path, *, bn: bool = True, generator: bool = False, feature_stats: bool = False,
                        dp: dict[str, DpRecord] | None = None, extra: dict[str, torch.Tensor] | None = None,
                        classifier_meta: dict[str, Any] | None = None, generator_meta: dict[str, Any] | None = None,
                        site: Any = "site-a") -> Path:
    """A small-cnn classifier (BatchNorm, or GroupNorm as after Opacus's fix), optionally a tiny generator and
    DP feature statistics; ``extra`` adds classifier tensors the architecture does not define."""
    root.mkdir(parents=True, exist_ok=True)
    state, cfg = classifier_state("batch" if bn else "group")
    state.update(extra or {})
    save_file(state, root / "classifier.safetensors")
    artifacts: dict[str, Any] = {"classifier": {**asdict(cfg), "image_size": 28, **(classifier_meta or {})}}
    if generator:
        save_file(generator_state(), root / "generator.safetensors")
        artifacts["generator"] = {"architecture": "unet2d-small", "config": dict(TINY_GENERATOR), "final_loss": 0.5,
                                  "scheduler": {"beta_start": 0.0001}, "training": {"epochs": 1, "seed": 0}, **(generator_meta or {})}
    if feature_stats:
        stats, layers = feature_stats_state("batch" if bn else "group")
        save_file(stats, root / "feature_stats.safetensors")
        artifacts["dp_feature_statistics"] = {"layers": layers}
    record = {"format": "secure-oneshot-model/v1", "site": site, "artifacts": artifacts,
              "dp": {a: r.to_json() for a, r in (dp or {}).items()}, "training": {"epochs": 1}}
    (root / "record.json").write_text(json.dumps(record, indent=2))
    return root

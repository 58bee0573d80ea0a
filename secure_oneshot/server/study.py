"""The server's distillation job: load the verified site models, distil one global model, and report it
beside every baseline (each site alone, the ensemble teacher, one-shot FedAvg).

Site models come from ``ingest``'s accepted bundles (re-opened and verified
with the server key: they are stored encrypted) or, for research, from model
directories.  Results: ``global.safetensors`` + ``report.json`` +
``report.md`` + ``synthetic.png`` (noise -> realistic trajectory), written
atomically.  The last epoch's student is reported; nothing is selected on the
test set.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._internal.atomic import atomic_write_bytes
from ..bundle import open_bundle
from ..errors import ConfigError
from ..keys import Identity, TrustStore
from ..metrics import evaluate_model
from ..models.classifier import ClassifierConfig, build_classifier
from ..policy.artifacts import load_model_dir
from .distill import DistillConfig, distill
from .ensemble import Ensemble, same_architecture
from .synthesis import InversionConfig, synthesize_batch

__all__ = ["SiteModel", "load_accepted", "load_model_dirs", "fedavg", "baselines", "DistillRun", "run_distillation", "PRESETS"]

# (inversion, distillation) presets.  "fedisca" is the method's own setting (GPU);
# "cpu" finishes in about a minute on 2 cores with small-cnn sites.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "fedisca": ({}, {}),
    "cpu": ({"batch_size": 64, "steps": 40, "snapshot_every": 4}, {"epochs": 8, "lr": 0.01}),
}


@dataclass
class SiteModel:
    name: str
    model: nn.Module
    config: ClassifierConfig
    feature_stats: dict[str, torch.Tensor] | None = None


def _classifier_config(meta: dict[str, Any]) -> ClassifierConfig:
    try:
        return ClassifierConfig(str(meta["architecture"]), int(meta["in_channels"]), int(meta["num_classes"]), str(meta.get("norm", "batch")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"the classifier's metadata does not say how to build it ({e})") from e


def _site_model(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> SiteModel:
    cfg = _classifier_config(meta)
    model = build_classifier(cfg)
    weights = {k.removeprefix("classifier/"): v for k, v in tensors.items() if k.startswith("classifier/")}
    # strict=False only for BatchNorm running statistics a policy kept at the site; everything else must match.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in missing):
        raise ConfigError(f"{name}: classifier weights do not fit {cfg.architecture} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    stats = {k.removeprefix("feature_stats/"): v for k, v in tensors.items() if k.startswith("feature_stats/")} or None
    return SiteModel(name, model.eval(), cfg, stats)


def load_accepted(accepted: Path, identity: Identity, trust: TrustStore) -> list[SiteModel]:
    """Re-open every accepted bundle (verifying it again) and build its classifier."""
    models = []
    for path in sorted(accepted.glob("*.sob")):
        opened = open_bundle(path, identity, trust)
        meta = opened.manifest.meta.get("artifacts", {}).get("classifier", {})
        models.append(_site_model(f"{opened.sender.name}:{opened.header.bundle_id[:8]}", dict(opened.tensors), meta))
    if not models:
        raise ConfigError(f"no accepted bundles in {accepted}", hint="run `secure-oneshot ingest` first")
    return models


def load_model_dirs(directories: list[Path]) -> list[SiteModel]:
    """Research mode: site models straight from model directories."""
    sites = []
    for directory in directories:
        candidate = load_model_dir(directory)
        sites.append(_site_model(directory.name, candidate.tensors, candidate.artifacts_meta.get("classifier", {})))
    return sites


def fedavg(models: list[nn.Module]) -> nn.Module:
    """One-shot FedAvg: the plain average of every floating-point weight and buffer (equal site weights)."""
    average = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged = {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
              for k, v in states[0].items()}
    average.load_state_dict(merged)
    return average.eval()


def baselines(sites: list[SiteModel], student: nn.Module | None, test_set: Any) -> dict[str, dict[str, float]]:
    """Metrics for every site alone, the ensemble teacher, FedAvg (same architectures only) and the global model."""
    rows = {s.name: evaluate_model(s.model, test_set) for s in sites}
    rows["ensemble (teacher)"] = evaluate_model(Ensemble([s.model for s in sites]), test_set)
    if same_architecture([s.model for s in sites]):
        rows["fedavg (one-shot)"] = evaluate_model(fedavg([s.model for s in sites]), test_set)
    if student is not None:
        rows["global (distilled)"] = evaluate_model(student, test_set)
    return rows


@dataclass
class DistillRun:
    student: nn.Module
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]
    synth: InversionConfig
    distill: DistillConfig
    outputs: dict[str, str] = field(default_factory=dict)


def _configs(sites: list[SiteModel], preset: str, image_size: int, seed: int) -> tuple[InversionConfig, DistillConfig]:
    synth_options, distill_options = PRESETS[preset]
    cfg = sites[0].config
    synth = InversionConfig(image_size=image_size, channels=cfg.in_channels, num_classes=cfg.num_classes, seed=seed, **synth_options)
    return synth, DistillConfig(seed=seed, **distill_options)


def _trajectory_grid(sites: list[SiteModel], synth: InversionConfig, path: Path) -> None:
    """A PNG of one class-balanced synthetic batch at 8 points from noise to realistic."""
    from torchvision.utils import save_image

    snapshots: list[torch.Tensor] = []
    small = InversionConfig(**{**asdict(synth), "batch_size": 8, "snapshot_every": max(1, synth.steps // 8)})
    stats = [s.feature_stats for s in sites]
    synthesize_batch([s.model for s in sites], None, small, on_snapshot=lambda step, x: snapshots.append(x[:8].cpu()),
                     feature_stats=stats if any(stats) else None, allow_ce_only=True)
    grid = torch.cat(snapshots[-8:]).clamp(-1, 1).add(1).div(2)  # (rows*8, C, H, W) in [0, 1]
    tmp = path.with_suffix(".tmp.png")  # torchvision writes by path: write aside, then rename
    save_image(grid, tmp, nrow=8)
    tmp.replace(path)


def run_distillation(sites: list[SiteModel], out: Path, *, preset: str = "cpu", student_arch: str | None = None,
                     test_set: Any = None, image_size: int = 28, seed: int = 0, progress: bool = False) -> DistillRun:
    """Distil a global model from ``sites`` and write it with its report into ``out``."""
    synth, dcfg = _configs(sites, preset, image_size, seed)
    torch.manual_seed(seed)
    student_cfg = ClassifierConfig(student_arch or sites[0].config.architecture, synth.channels, synth.num_classes, "batch")
    stats = [s.feature_stats for s in sites]
    result = distill(build_classifier(student_cfg), [s.model for s in sites], synth, dcfg, eval_set=test_set, progress=progress,
                     feature_stats=stats if any(stats) else None, allow_ce_only=not any(stats))
    metrics = baselines(sites, result.student, test_set) if test_set is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in result.student.state_dict().items()}
    atomic_write_bytes(out / "global.safetensors", save(state))
    _trajectory_grid(sites, synth, out / "synthetic.png")
    run = DistillRun(result.student, result.history, metrics, synth, dcfg)
    report = {"student": asdict(student_cfg), "sites": [s.name for s in sites], "inversion": asdict(synth), "distill": asdict(dcfg),
              "history": result.history, "metrics": metrics, "selection": "last epoch (no selection on the test set)"}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode("utf-8"))
    atomic_write_bytes(out / "report.md", markdown_report(metrics).encode("utf-8"))
    run.outputs = {name: str(out / name) for name in ("global.safetensors", "report.json", "report.md", "synthetic.png")}
    return run


def markdown_report(metrics: dict[str, dict[str, float]]) -> str:
    lines = ["| model | ACC | AUC | balanced ACC |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {m['acc']:.3f} | {m['auc']:.3f} | {m['balanced_acc']:.3f} |" for name, m in metrics.items()]
    return "\n".join(lines) + "\n\nThe global model is the last epoch's; nothing is selected on the test set.\n"

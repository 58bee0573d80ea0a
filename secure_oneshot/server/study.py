"""The server's distillation job: distil one global model from the verified site models
(:mod:`~secure_oneshot.server.site_models`) and report it beside every baseline (each site alone, the
ensemble teacher, one-shot FedAvg).

Results: ``global.safetensors`` + ``report.json`` +
``report.md`` + ``synthetic.png`` (noise -> realistic trajectory), written
atomically.  The last epoch's student is reported; nothing is selected on the
test set.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._internal.atomic import atomic_write_bytes
from .._internal.termsafe import printable
from ..bundle.safetensors_strict import serialize_tensors
from ..data.proxy_images import ProxyImages, load_proxy_images
from ..errors import ConfigError
from ..keys import Identity
from ..metrics import evaluate_model
from ..models.classifier import ARCHITECTURES, ClassifierConfig
from ..models.imagenet_init import initial_classifier
from .class_evidence import EVIDENCE_CHOICES, check_class_evidence
from .class_prior import LABEL_COUNTS, PRIOR_TARGETS, PriorMatch
from .checkpoint import Checkpoint, check_fingerprint, clear_checkpoints, load_latest, model_digest, restore, save_checkpoint
from .distill import DistillConfig, TrainingState, distill, student_norm
from .distributed import Distributed
from .ensemble import Ensemble, normalise_weights
from .calibration import calibrate_for_synthesis
from .execution import Execution
from .privacy_position import position_markdown, privacy_position
from .site_models import (SiteModel, baselines, bn_statistics_released, fedavg, is_multi_label, load_accepted,
                          load_model_dirs)
from .snapshot_store import DEFAULT_SNAPSHOT_MEMORY_MIB
from .student_init import STUDENT_INITS, StudentStart, start_student
from .sources import PROXY_METHODS, SiteGenerator, SynthesisMethod
from .synthesis import InversionConfig, synthesize_batch
from .teacher import match_prior, prior_options, prior_target, recalibrates, teacher_sites_for, teacher_weights
from .weighting import WEIGHTINGS, default_weighting

__all__ = ["SiteModel", "load_accepted", "load_model_dirs", "fedavg", "baselines", "DistillJob", "DistillRun", "run_distillation", "prior_options", "PRESETS",
           "SELECTION", "teacher_weights", "teacher_sites_for"]

# (inversion, distillation) settings per preset; every other field keeps the method's default.
# "paper" is the method's own setting (GPU).  "cpu" lowers the BN-loss weight from 10 to 0.1: with
# 100 inversion steps instead of 500, at weight 10 the BN term drowns the CE term (measured on 5
# non-IID PneumoniaMNIST sites: the teacher labels 52% of the images as their target class at 10,
# 98% at 0.1, while the BN loss itself ends only 12% higher: 21.3 vs 19.1).  See benchmarks/RESULTS.md.
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "paper": ({}, {}),   # at more than 128 px: PAPER_LARGE as well (DistillJob.configs)
    "gpu": ({"steps": 200, "snapshot_every": 2}, {"epochs": 40, "milestones": (0.5, 0.75)}),
    # cpu: milestones (0.6, 0.8) keep the drops its studies were measured with at 6 epochs (1-based epochs 4 and 5);
    # at its 16 epochs they fall on epochs 10 and 13.
    "cpu": ({"batch_size": 64, "steps": 100, "bn_weight": 0.1}, {"epochs": 16, "recalibrate_bn": 0.25, "milestones": (0.6, 0.8)}),
    "smoke": ({"batch_size": 32, "steps": 12, "snapshot_every": 2, "bn_weight": 0.1}, {"epochs": 2, "recalibrate_bn": 0.25}),
}
# The method's 224 px runs: 50 images per batch and 1,000 inversion steps (its README's commands), a jitter of
# +/-30 px (its code switches from 2 to 30 above 128 px), and an ImageNet-initialised student ("--pretrained"; its
# site models are ImageNet-initialised too).  Every snapshot is kept, as at 28 px: 50 x 3 x 224 x 224 float32 x
# 1,000 steps is about 30 GB, so beyond DistillJob.snapshot_memory_mib they wait in a temporary file
# (server.snapshot_store), read back one at a time.
LARGE_IMAGE = 128   # px: above this, "paper" follows the published 224 px settings
PAPER_LARGE: dict[str, Any] = {"batch_size": 50, "steps": 1000, "jitter": 30}


@dataclass(frozen=True)
class DistillJob:
    """What to run: a preset plus explicit overrides (``None`` keeps the preset's value)."""

    preset: str = "cpu"
    student_arch: str | None = None           # default: the first site's architecture
    method: SynthesisMethod = field(default_factory=SynthesisMethod)
    execution: Execution = field(default_factory=Execution)
    image_size: int = 28
    seed: int = 0
    epochs: int | None = None
    noise_adapted: str | None = None
    teacher_weighting: str | None = None      # None: weighting.default_weighting(preset)
    imagenet_weights: str = ""                # a local safetensors file to initialise the student from ("": random)
    proxy_images: str = ""                    # public unlabelled images for the proxy methods (data.proxy_images)
    data_root: str | None = None              # where a MedMNIST proxy set is found
    snapshot_memory_mib: float = DEFAULT_SNAPSHOT_MEMORY_MIB   # an epoch's snapshots in memory up to this, then a temp file
    prior_matching: bool = True               # with public images: match the student's class prior (class_prior)
    prior_target: str | None = None           # teacher | label_counts; None: label_counts when every site released them
    site_recalibration: bool = True           # consensus with every site's label counts: sites' decision points moved (site_calibration)
    class_evidence: str = "require"           # require | report: a class no site's label counts show both sides of (class_evidence)
    student_init: str | None = None           # random | site (student_init); None: site for the proxy methods unless that site used DP

    def __post_init__(self) -> None:
        if self.preset == "paper" and self.image_size > LARGE_IMAGE and not self.imagenet_weights:
            raise ConfigError(f"the paper preset at {self.image_size} px starts the student from ImageNet weights, as the "
                              "published method does, and they cannot be downloaded here",
                              hint="pass --imagenet-weights FILE (torchvision's resnet18 as safetensors; README \"224 px\"), "
                                   "or run another preset")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}", hint=f"use one of {', '.join(PRESETS)}")
        if self.student_arch is not None and self.student_arch not in ARCHITECTURES:
            raise ConfigError(f"unknown student architecture '{printable(self.student_arch, 60)}'",
                              hint=f"use one of {', '.join(sorted(ARCHITECTURES))}")
        if self.method.method in PROXY_METHODS and not self.proxy_images:
            raise ConfigError(f"synthesis {self.method.method!r} needs public proxy images",
                              hint="pass --proxy-images FLAG:SPLIT (a MedMNIST set no site holds) or a folder of images")
        if self.teacher_weighting is not None and self.teacher_weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown teacher weighting {self.teacher_weighting!r}", hint=f"use one of {', '.join(WEIGHTINGS)}")
        if not 0 <= self.snapshot_memory_mib < float("inf"):
            raise ConfigError(f"the snapshot memory budget must be a finite number of MiB >= 0, got {self.snapshot_memory_mib!r}",
                              hint="0 keeps every snapshot in the temporary file; the default keeps 28 px runs in memory")
        if self.prior_target is not None and self.prior_target not in PRIOR_TARGETS:
            raise ConfigError(f"unknown prior-matching target {printable(str(self.prior_target), 40)!r}",
                              hint=f"use one of {', '.join(PRIOR_TARGETS)}")
        if self.class_evidence not in EVIDENCE_CHOICES:
            raise ConfigError(f"unknown class-evidence choice {printable(str(self.class_evidence), 40)!r}",
                              hint=f"use one of {', '.join(EVIDENCE_CHOICES)}")
        if self.student_init is not None and self.student_init not in STUDENT_INITS:
            raise ConfigError(f"unknown student start {printable(str(self.student_init), 40)!r}",
                              hint=f"use one of {', '.join(STUDENT_INITS)}")
        if self.student_init == "site" and self.imagenet_weights:
            raise ConfigError("the student can start from ImageNet weights or from a site's weights, not both",
                              hint="drop --imagenet-weights or --student-init site")
        if self.teacher_weighting == "consensus" and not self.proxy_images:
            raise ConfigError("teacher weighting 'consensus' judges the sites on public images, and none were given",
                              hint="pass --proxy-images FLAG:SPLIT or a folder of public images, or use --teacher-weighting agreement")

    @property
    def weighting(self) -> str:
        """The teacher-weighting scheme this job runs (the named one, else the preset's default)."""
        return self.teacher_weighting or default_weighting(self.preset, public_images=bool(self.proxy_images))

    @property
    def student_start(self) -> str:
        """``random`` (as built: random, or ImageNet with ``imagenet_weights``) or ``site``: the named choice, else
        ``site`` without ImageNet weights for the proxy methods and for data-free ``inversion`` outside the ``paper``
        preset, else ``random`` (the published method; the generator methods, not measured with a site start).  A
        default ``site`` start stays random when the chosen site trained with DP (:mod:`~.student_init`)."""
        if self.student_init is not None:
            return self.student_init
        measured = self.method.method in PROXY_METHODS or (self.method.method == "inversion" and self.preset != "paper")
        return "site" if measured and not self.imagenet_weights else "random"

    def configs(self, sites: list[SiteModel]) -> tuple[InversionConfig, DistillConfig]:
        synth_options, distill_options = PRESETS[self.preset]
        if self.preset == "paper" and self.image_size > LARGE_IMAGE:
            synth_options = {**synth_options, **PAPER_LARGE}
        overrides = {k: v for k, v in (("epochs", self.epochs), ("noise_adapted", self.noise_adapted)) if v is not None}
        cfg = sites[0].config
        synth = InversionConfig(image_size=self.image_size, channels=cfg.in_channels, num_classes=cfg.num_classes, seed=self.seed,
                                multi_label=is_multi_label(sites), **synth_options)
        return synth, DistillConfig(seed=self.seed, **{**distill_options, **overrides})


@dataclass
class DistillRun:
    student: nn.Module
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]
    synth: InversionConfig
    distill: DistillConfig
    outputs: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


TRAJECTORY_ROWS = 8


def _trajectory_grid(sites: list[SiteModel], synth: InversionConfig, execution: Execution, path: Path, method: SynthesisMethod,
                     weights: torch.Tensor | None = None) -> None:
    """A PNG of 8 synthetic images at 8 points from noise (top) to realistic (bottom): inversion steps (by the teacher
    with ``weights``), DDIM steps of the sites' generators, or (mixed) 4 columns of each."""
    from torchvision.utils import save_image

    generators = [s.generator for s in sites if s.generator is not None]
    n_generated = {"generator": 8, "mixed": 4}.get(method.method, 0) if generators else 0  # proxy images are not drawn
    columns = []
    if n_generated < 8:
        columns.append(_inversion_trajectory(sites, synth, execution, 8 - n_generated, weights))
    if n_generated:
        columns.append(_generator_trajectory(generators, synth, method, n_generated))
    grid = torch.cat(columns, dim=1).flatten(0, 1).clamp(-1, 1).add(1).div(2)  # (rows*8, C, H, W) in [0, 1]
    tmp = path.with_suffix(".tmp.png")  # torchvision writes by path: write aside, then rename
    save_image(grid, tmp, nrow=8)
    tmp.replace(path)


def _inversion_trajectory(sites: list[SiteModel], synth: InversionConfig, execution: Execution, count: int,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, count, C, H, W): one class-balanced inversion batch at evenly spaced steps."""
    snapshots: list[torch.Tensor] = []
    small = InversionConfig(**{**asdict(synth), "batch_size": 8, "snapshot_every": max(1, synth.steps // TRAJECTORY_ROWS)})
    models = [s.model for s in sites]
    teacher = Ensemble(models, weights=weights) if weights is not None else None  # None: synthesis builds the plain mean
    synthesize_batch(models, teacher, small, execution=execution, on_snapshot=lambda step, x: snapshots.append(x[:count].cpu()),
                     **prior_options(sites, student=None))
    return torch.stack(_evenly_spaced(snapshots)).float()


def _evenly_spaced(steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """TRAJECTORY_ROWS of ``steps`` from first to last (repeating some when there are fewer)."""
    return [steps[k] for k in torch.linspace(0, len(steps) - 1, TRAJECTORY_ROWS).round().long().tolist()]


def _generator_trajectory(generators: list[SiteGenerator], synth: InversionConfig, method: SynthesisMethod, count: int) -> torch.Tensor:
    """(rows, count, C, H, W): class-balanced DDIM samples (generators taking turns, as in training) at evenly spaced steps."""
    from ..client.generator import sample_images
    from .sources import generator_labels

    labels, owner = generator_labels(count, synth.num_classes, len(generators))
    columns = []
    for i in range(count):
        steps: list[torch.Tensor] = []
        site = generators[int(owner[i])]
        sample_images(site.model, site.scheduler, labels[i:i + 1], steps=method.generator_steps, seed=synth.seed + i, on_step=steps.append)
        columns.append(torch.cat(_evenly_spaced(steps)))  # (rows, C, H, W)
    return torch.stack(columns, dim=1)


def run_distillation(sites: list[SiteModel], out: Path, job: DistillJob | None = None, *, test_set: Any = None, progress: bool = False,
                     on_epoch: Any = None, audit_to: tuple[Path, Identity] | None = None, resume: bool = False,
                     distributed: Distributed | None = None) -> DistillRun:
    """Distil a global model from ``sites`` and write it with its report into ``out``.

    Writes ``global.safetensors``, ``report.json``, ``report.md`` and ``synthetic.png`` (each atomically, after
    the last epoch) and, with ``audit_to = (log, server identity)``, appends a ``distill`` record naming the
    bundles used and the global model's SHA-256.  ``test_set`` is only evaluated, never used to select (the last
    epoch is kept).  After every epoch a checkpoint goes to ``out/checkpoint``
    (:mod:`~secure_oneshot.server.checkpoint`); ``resume`` continues from the newest complete one (none: from
    the start).  Under ``distributed`` (:mod:`~secure_oneshot.server.distributed`) every rank trains and only
    rank 0 writes; the others return a run without outputs.

    Raises:
        ConfigError: ``out`` holds an unfinished run's checkpoint and ``resume`` is off, or a checkpoint of
            another job (fingerprint).
        EvidenceError: ``job.class_evidence`` is ``require`` and the sites' released label counts show no hospital
            with records of both sides of some class (:mod:`~.class_evidence`); checked before any work.
    """
    job = job or DistillJob()
    dist = distributed or Distributed()
    evidence = check_class_evidence(sites, job.class_evidence)
    synth, dcfg = job.configs(sites)
    torch.manual_seed(job.seed)
    student_cfg = ClassifierConfig(job.student_arch or sites[0].config.architecture, synth.channels, synth.num_classes,
                                  student_norm([s.model for s in sites]))  # the sites' normalisation (see student_norm)
    student = initial_classifier(student_cfg, job.imagenet_weights)
    prior = prior_options(sites, student)
    started = time.perf_counter()
    # Multi-label sites have no per-class weighting: the preset's default scheme gives way to the equal teacher.
    scheme = "equal" if synth.multi_label and job.teacher_weighting is None else job.weighting
    models = [s.model for s in sites]
    target = prior_target(sites, job.prior_target)   # checked before training, used after it
    proxy = load_proxy_images(job.proxy_images, size=synth.image_size, channels=synth.channels, data_root=job.data_root) \
        if job.method.method in PROXY_METHODS or scheme == "consensus" else None
    public = None if proxy is None else proxy_tensor(proxy)   # one float copy, shared read-only by every step below
    fields = {**_fingerprint_fields(job, synth, dcfg, scheme, student_cfg, sites, dist), "proxy": None if proxy is None else proxy.record()}
    checkpoint = _checkpoint_to_resume(out, resume, fields, dcfg.epochs, dist.is_main)
    rank_synth = dist.inversion(synth)
    # measured once, used by every step below (a resumed run keeps the measured choice of its first start)
    execution = _resumed_execution(job.execution, checkpoint) or calibrate_for_synthesis(job.execution, models, student, rank_synth)
    teacher_sites, calibration = teacher_sites_for(sites, scheme, synth, execution, public,
                                                  enabled=job.site_recalibration)
    models = [s.model for s in teacher_sites]
    weights = checkpoint.teacher_weights if checkpoint is not None else \
        teacher_weights(teacher_sites, scheme, synth, execution, public=public)
    # after the teacher's weights, which choose the site; a resumed run loads its checkpoint's weights over it
    start = StudentStart("imagenet", note=Path(job.imagenet_weights).name) if job.imagenet_weights else \
        start_student(student, job.student_start, teacher_sites, weights, student_cfg, explicit=job.student_init is not None)
    rank_images: list[list[str]] = list(checkpoint.meta.get("rank_image_sha256", [])) if checkpoint is not None else []

    def on_epoch_end(state: TrainingState) -> None:
        rank_images.append(dist.gather_digests(state.last_images))   # a collective: every rank, every epoch
        if dist.is_main:
            save_checkpoint(out, state, fields, teacher_weights=weights,
                            extra={"execution": _execution_choice(execution), "rank_image_sha256": rank_images})

    result = distill(student, models, rank_synth, dcfg, execution=execution, eval_set=test_set if dist.is_main else None,
                     progress=progress and dist.is_main, on_epoch=on_epoch if dist.is_main else None,
                     feature_stats=prior["feature_stats"], adversarial=prior.get("student") is not None,
                     method=job.method, generators=[s.generator for s in teacher_sites if s.generator is not None], teacher_weights=weights,
                     proxy_images=public,
                     resume=None if checkpoint is None else lambda state: restore(checkpoint, state),
                     on_epoch_end=on_epoch_end, wrap_student=dist.wrap, snapshot_memory_mib=job.snapshot_memory_mib)
    if not dist.is_main:
        return DistillRun(result.student, result.history, {}, synth, dcfg)
    seconds = time.perf_counter() - started
    student = result.student.cpu().to(memory_format=torch.contiguous_format).eval()
    matched: PriorMatch | None = None
    unmatched: nn.Module | None = None   # kept only to report it beside the matched model
    if job.prior_matching and public is not None and not synth.multi_label:
        unmatched = copy.deepcopy(student) if test_set is not None else None
        matched = match_prior(teacher_sites, student, public, weights, synth, execution, target)
    metrics = baselines(sites, student, test_set, weights, teacher=teacher_sites) if test_set is not None else {}
    if matched is not None and matched.applied and unmatched is not None:
        metrics["global (before prior matching)"] = evaluate_model(unmatched, test_set)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    # The project's own writer, not safetensors.torch.save: safetensors 0.8 writes the metadata keys in a per-call
    # hash order (two orders measured for the same tensors), so the same model got two SHA-256s; here tensors are
    # sorted by name and the metadata keys are written in this fixed order.
    global_bytes = b"".join(serialize_tensors(state, metadata={"architecture": student_cfg.architecture,
                                                               "format": "secure-oneshot-global/v1"}))
    atomic_write_bytes(out / "global.safetensors", global_bytes)
    _trajectory_grid(teacher_sites, synth, execution, out / "synthetic.png", job.method, weights)
    report = {"student": asdict(student_cfg), "sites": [{"name": s.name, "bundle_id": s.bundle_id, "architecture": s.config.architecture,
                                                          "generator": s.generator is not None, "feature_stats": s.feature_stats is not None,
                                                          "bn_statistics": bn_statistics_released(s.model),
                                                          "label_counts": s.label_counts is not None}
                                                         for s in sites],
              "preset": job.preset, "method": asdict(job.method), "proxy_images": None if proxy is None else proxy.record(),
              "execution": execution.for_models(models).describe(),
              "task": "multi-label" if synth.multi_label else "one class per image",
              "prior_matching": None if matched is None else matched.record(),
              "site_recalibration": None if calibration is None else calibration.record(),
              "class_evidence": {"choice": job.class_evidence, **evidence.record()},
              "teacher_weighting": {"scheme": scheme,
                                    "weights": None if weights is None else [[round(float(w), 4) for w in row]
                                                                             for row in normalise_weights(weights, len(sites))]},
              "student_init": start.record(),
              "inversion": asdict(synth), "distill": asdict(dcfg), "seconds": round(seconds, 1), "history": result.history,
              "metrics": metrics, "global_sha256": hashlib.sha256(global_bytes).hexdigest(), "selection": SELECTION,
              "privacy": privacy_position([(s.name, s.bundle_id, s.privacy_statement) for s in sites]),
              "distributed": {**dist.describe(synth), "rank_image_sha256": rank_images}}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode("utf-8"))
    atomic_write_bytes(out / "report.md", markdown_report(metrics, report).encode("utf-8"))
    run = DistillRun(student, result.history, metrics, synth, dcfg, report=report)
    run.outputs = {name: str(out / name) for name in ("global.safetensors", "report.json", "report.md", "synthetic.png")}
    if audit_to is not None:
        _audit_distill(audit_to, run, sites)
    return run


def proxy_tensor(proxy: ProxyImages) -> torch.Tensor:
    """The proxy images as the sites see their own: float ``(N, C, H, W)`` in [-1, 1] (``data.to_dataset``'s scaling)."""
    images = torch.from_numpy(proxy.images).float().div_(255.0)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2).contiguous()
    return images.sub_(0.5).div_(0.5)


def _fingerprint_fields(job: DistillJob, synth: InversionConfig, dcfg: DistillConfig, scheme: str, student_cfg: ClassifierConfig,
                        sites: list[SiteModel], dist: Distributed) -> dict[str, Any]:
    """What decides a run's result, for the checkpoint's fingerprint (:mod:`~secure_oneshot.server.checkpoint`)."""
    return {"inversion": asdict(synth), "distill": asdict(dcfg), "method": asdict(job.method), "teacher_weighting": scheme,
            "site_recalibration": recalibrates(sites, scheme, synth, job.site_recalibration),
            "student": asdict(student_cfg),
            "student_init": Path(job.imagenet_weights).name if job.imagenet_weights else job.student_start,
            "distributed": dist.describe(synth),
            "sites": {f"{i}:{s.name}": {"bundle_id": s.bundle_id, "weights_sha256": model_digest(s.model)} for i, s in enumerate(sites)}}


def _checkpoint_to_resume(out: Path, resume: bool, fields: dict[str, Any], epochs: int, is_main: bool) -> Checkpoint | None:
    """The checkpoint to continue from (``resume``), after the fingerprint check; a fresh run refuses to replace
    an unfinished run's checkpoints and clears a finished run's."""
    checkpoint = load_latest(out)
    if resume:
        if checkpoint is not None:
            check_fingerprint(checkpoint, fields)
        return checkpoint
    if checkpoint is not None and checkpoint.epochs_done < int(checkpoint.meta.get("fingerprint_fields", {}).get("distill", {}).get("epochs", 0)):
        raise ConfigError(f"{out} holds the checkpoint of an unfinished run ({checkpoint.epochs_done} epochs done)",
                          hint=f"pass --resume to continue it, or remove {checkpoint.path.parent} to start over")
    if is_main:
        clear_checkpoints(out)
    return None


def _execution_choice(execution: Execution) -> dict[str, Any] | None:
    """A measured precision and layout, kept in the checkpoint so that a resumed run computes alike."""
    if execution.calibration is None:
        return None
    return {"precision": execution.precision, "channels_last": execution.channels_last}


def _resumed_execution(requested: Execution, checkpoint: Checkpoint | None) -> Execution | None:
    choice = checkpoint.meta.get("execution") if checkpoint is not None else None
    if not isinstance(choice, dict):
        return None
    return dataclasses.replace(requested, precision=str(choice["precision"]), channels_last=bool(choice["channels_last"]),
                               calibration={"choice": "kept from the checkpoint", "timings_ms": {}, "cached": True})


SELECTION = "last epoch; no model selection (the test set is only evaluated)"


def _audit_distill(audit_to: tuple[Path, Identity], run: DistillRun, sites: list[SiteModel]) -> None:
    from .. import audit

    log, identity = audit_to
    event = audit.AuditEvent(
        action="distill", outcome="ok", reason=f"global model distilled from {len(sites)} site models",
        details={"bundle_ids": [s.bundle_id for s in sites if s.bundle_id], "sites": [s.name for s in sites],
                 "global_sha256": run.report["global_sha256"], "preset": run.report["preset"],
                 "method": run.report["method"]["method"], "outputs": run.outputs},
    )
    audit.append_event(log, identity, event)


def metrics_markdown(metrics: dict[str, dict[str, float]]) -> list[str]:
    """The baseline table as Markdown rows (model, ACC, AUC, balanced ACC)."""
    return ["| model | ACC | AUC | balanced ACC |", "| --- | --- | --- | --- |",
            *(f"| {name} | {m['acc']:.3f} | {m['auc']:.3f} | {m['balanced_acc']:.3f} |" for name, m in metrics.items())]


def markdown_report(metrics: dict[str, dict[str, float]], report: dict[str, Any] | None = None) -> str:
    lines = metrics_markdown(metrics)
    if report:
        lines += ["", f"Preset `{report['preset']}`, synthesis `{report['method']['method']}`, "
                      f"{report['distill']['epochs']} epochs in {report['seconds']} s on {report['execution']['device']} "
                      f"({report['execution']['precision']})."]
        matched = report.get("prior_matching")
        if matched and matched["applied"]:
            def shown(values: list[float], sign: str = "") -> str:
                return ", ".join(f"{v:{sign}.3f}" for v in values)
            if matched.get("target") == LABEL_COUNTS:
                lines += ["", f"Prior matching: class offsets ({shown(matched['offsets'], '+')}) fitted on {matched['images']} public "
                              f"images, so that the global model's decisions there fall into the classes in the shares "
                              f"({shown(matched['student_decision_shares_after'])}) of the sites' pooled label counts "
                              f"({shown(matched['label_count_shares'])}); before: ({shown(matched['student_decision_shares_before'])})."]
            else:
                lines += ["", f"Prior matching: class offsets ({shown(matched['offsets'], '+')}) fitted on {matched['images']} public "
                              f"images, so that the global model's mean class probabilities there "
                              f"({shown(matched['student_mean_probability_after'])}) equal the teacher's; before: "
                              f"({shown(matched['student_mean_probability_before'])})."]
        elif matched:
            lines += ["", f"Prior matching not applied: {matched['reason']}."]
        start = report.get("student_init")
        if isinstance(start, dict) and start.get("kind") == "site":
            lines += ["", f"Student: started from {start['site']}'s released weights, the site with the largest share "
                          f"({start['teacher_weight_share']:.2f}) of the teacher's weight."]
        elif isinstance(start, dict) and start.get("note"):
            lines += ["", f"Student: started from {start['kind']} weights ({start['note']})."]
        calibration = report.get("site_recalibration")
        if calibration:
            lines += ["", "Site recalibration: " + (
                "before the consensus, each site's decision point was moved (on a server-side copy) so that its decisions "
                "on the public images fall into the pooled label counts' class shares "
                f"({', '.join(f'{v:.3f}' for v in calibration['target_shares'])}); the sites' own rows use the models as sent."
                if calibration["applied"] else f"not applied: {calibration['reason']}.")]
        evidence = report.get("class_evidence")
        if evidence:
            lines += ["", _evidence_line(evidence)]
        if "privacy" in report:
            lines += ["", *position_markdown(report["privacy"])]
    return "\n".join(lines) + f"\n\nModel selection: {SELECTION}.\n"


def _evidence_line(evidence: dict[str, Any]) -> str:
    """The class-evidence finding (:mod:`~.class_evidence`) as one sentence of the report."""
    if not evidence.get("judged"):
        return f"Class evidence not judged: {evidence['reason']}."
    shown = "; ".join(f"class {c}: {', '.join(names) or 'none'}" for c, names in enumerate(evidence["supporting_sites"]))
    if not evidence["unsupported_classes"]:
        return f"Class evidence: sites whose released label counts show both sides of each class ({shown})."
    return (f"**Class evidence: no site's released label counts show both sides of class(es) "
            f"{', '.join(map(str, evidence['unsupported_classes']))}** ({shown}); distilled anyway "
            f"(`class_evidence = {evidence['choice']}`): this model's ranking of them is not supported by any hospital's data.")

"""``secure-oneshot demo``: a whole one-shot study, end to end, on one machine.

Simulates N hospitals and a study server with real keys, policies, bundles and
audit logs, all under one run folder::

    RUN/
      keys/            one identity per hospital, the server and the data protection officer (dpo);
                       trust.toml.  Demo keys are NOT passphrase-protected: never use them for real data.
      policies/        site-export.toml (+ .sig, signed by the dpo) and server-ingest.toml
      partition.json   which records each hospital holds (Dirichlet over labels)
      sites/NAME/      model/ (trained model directory), outbox/NAME.sob, audit.jsonl
      server/          inbox/, accepted/, quarantine/, ledger.db, audit.jsonl
      server/global/   global.safetensors, report.json, report.md, synthetic.png
      results.json, results.md, report.html (one self-contained page for reviewers; plots/ holds its label chart)

Steps: identities and trust -> policies (signed) -> partition -> train each site
-> export (policy-checked, signed, encrypted, audited) -> transfer to the
server inbox (plus, by default, one deliberately tampered copy, which ingest
must quarantine) -> ingest -> distil -> baselines (each site, ensemble,
FedAvg, global, and centralised training on the pooled records) on the test
split, which is only evaluated: the global model is the last epoch's.

With several workers (``DemoConfig.workers``, the CLI's ``--threads``; default the CPUs this process may use) the
hospitals train side by side in processes of one torch thread each, and the centralised reference trains with them
(client.parallel_sites); ``--threads 1`` trains them one after another in this process, to the same model files.
With DP the server distils for the preset's ``dp_server_epochs`` (cpu: :data:`DP_DEMO_SERVER_EPOCHS`) and, unless
``public_fraction`` is given, sets the preset's ``dp_public_fraction`` of the records aside as its public unlabelled
images (cpu: :data:`DP_DEMO_PUBLIC_FRACTION`).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._internal.atomic import atomic_write_bytes
from ._internal.process_pool import Plain, run_jobs
from .client.export import ExportRequest, export_model
from .client.parallel_sites import pooled_reference, pooled_reference_job, run_pooled_reference_job, run_site_job, site_job, site_summary
from .client.site import run_site
from .client.site_config import SiteConfig
from .client.train import PRESETS as TRAIN_PRESETS
from .client.train import DataConfig, TrainConfig, site_data
from .data import Partition, load_medmnist, partition_indices, to_dataset
from .data.medmnist_data import SIZES, medmnist_file, num_classes
from .data.partition import label_counts, public_indices
from .demo_policies import export_policy_text, ingest_policy_text
from .errors import ConfigError
from .keys import Identity, TrustEntry, TrustStore, load_trust_store, save_identity, save_trust_store
from .keys.keyfile import UnsafePlaintextKeyWarning
from .models.classifier import ClassifierConfig
from .models.specs import config_default_architecture
from .policy.load import load_export_policy, load_ingest_policy
from .policy.signatures import sign_policy
from .research.html_study import write_demo_report
from .server.execution import Execution
from .server.ingest import BundleOutcome, IngestFolders, ingest_inbox
from .server.sources import PROXY_METHODS, SynthesisMethod
from .server.study import LARGE_IMAGE, DistillJob, DistillRun, load_accepted, metrics_markdown, run_distillation

__all__ = ["DemoConfig", "DemoResult", "DEMO_PRESETS", "run_demo", "metrics_table", "summary_lines", "create_identities",
           "write_policies", "train_sites", "export_all", "centralised_reference", "server_command"]


THRESHOLD_SHARE = 0.1
"""With DP on a binary task, a tenth of each hospital's epsilon measures its decision threshold (client.threshold):
without it a DP site model predicts the majority class (benchmarks/RESULTS.md)."""
STATS_SHARE = 0.1
"""With DP, a tenth of each hospital's epsilon releases its DP feature statistics (the server's synthesis prior for
GroupNorm sites); ``dp_epsilon`` is every release of a hospital together, so the rest trains the classifier."""


@dataclass(frozen=True)
class DemoPreset:
    sites: int
    architecture: str
    train: TrainConfig
    server: str            # a server.study preset
    dp_train: TrainConfig = TRAIN_PRESETS["dp"]   # the hospitals' recipe when DP is on (tuned for DP-SGD)
    dp_server_epochs: int | None = None           # the server's distillation epochs when DP is on; None: the server preset's
    dp_public_fraction: float = 0.0               # with DP, unless given: the records set aside as the server's public images


DP_DEMO_SERVER_EPOCHS = 6
"""The cpu demo's distillation epochs with DP: on the DP demo's sites 6 epochs of the cpu server preset gave ACC 0.833 /
AUC 0.907 / bal. ACC 0.817 against 0.840 / 0.911 / 0.836 for its 16, at 6/16 of the server's time, which keeps the
DP demo within minutes on 2 cores (benchmarks/RESULTS.md).  The cpu preset's milestones (0.6, 0.8) fall on epochs 4
and 5 there, the schedule its studies were measured with."""


DP_DEMO_PUBLIC_FRACTION = 0.1
"""With DP the cpu demo sets a tenth of the records aside as the server's public unlabelled images (proxy synthesis,
prior matching on them), unless ``--public-fraction`` says otherwise (0: data-free inversion).  Why: from DP hospitals
the data-free student can keep much of the teacher's ranking and still lose its decision point on real images: one DP
demo draw gave ACC 0.522 at AUC 0.830 (teacher 0.877 / 0.943), and nothing the data-free server holds pins that
point down.  With the public images, and the global model's decision point matched there to the hospitals' pooled
DP label counts (``server.class_prior``), four DP draws gave global ACC 0.817-0.837 (majority rate 0.625) in
300-470 CPU-s for the whole demo (4 minutes on 2 quiet cores), against 1,186 data-free (no inversion;
benchmarks/RESULTS.md).  The published method is data-free: ``--public-fraction 0`` runs it."""


DEMO_PRESETS: dict[str, DemoPreset] = {
    "smoke": DemoPreset(3, "small-cnn", replace(TRAIN_PRESETS["cpu"], epochs=2), "smoke", replace(TRAIN_PRESETS["dp"], epochs=3)),
    "cpu": DemoPreset(5, "small-cnn", TRAIN_PRESETS["cpu"], "cpu", dp_server_epochs=DP_DEMO_SERVER_EPOCHS,
                      dp_public_fraction=DP_DEMO_PUBLIC_FRACTION),
    "gpu": DemoPreset(5, "resnet18-cifar", replace(TRAIN_PRESETS["fedisca"], epochs=30, lr=0.01), "gpu"),
    "paper": DemoPreset(5, "resnet18-cifar", TRAIN_PRESETS["fedisca"], "paper"),
}


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    flag: str = "pneumoniamnist"
    data_root: str | None = None
    preset: str = "auto"             # auto: gpu when CUDA is visible, else cpu
    sites: int | None = None         # default: the preset's
    alpha: float = 0.5               # Dirichlet concentration over labels
    seed: int = 0
    tamper: bool = True              # also deliver a tampered copy of one bundle (must be quarantined)
    centralised: bool = True         # train on the pooled records too (a research-only reference)
    dp_epsilon: float | None = None  # train every hospital's classifier with DP-SGD to this epsilon
    stats_epsilon: float | None = None  # with DP: the DP feature statistics' budget, taken out of dp_epsilon; None: STATS_SHARE
    label_counts_epsilon: float = 0.1  # with DP: the DP label histogram's budget (taken out of dp_epsilon)
    threshold_epsilon: float | None = None  # with DP: the DP decision threshold's budget; None: THRESHOLD_SHARE of dp_epsilon
    generator: dict[str, Any] | None = None  # sites also train a diffusion generator: SiteConfig [generator] options
    execution: Execution = field(default_factory=Execution)
    teacher_weighting: str | None = None  # the server's teacher (server.weighting); None: the preset's default
    class_evidence: str = "require"       # require | report (server.class_evidence)
    public_fraction: float | None = None   # set this fraction of the records aside as the server's public unlabelled
                                           # images; None: the preset's dp_public_fraction with DP, else none
    synthesis: str | None = None     # server.sources method; None: "proxy" with a public set, else "inversion"
    stop_after: str | None = None    # "ingest": the hospitals' half only; server_command() is the server's half
    size: int = 28                   # MedMNIST+ image size: <flag>_<size>.npz (28 px: <flag>.npz); sites train
                                     # config_default_architecture(size) above 28 px
    workers: int | None = None       # processes of one torch thread that train the hospitals (and the centralised
                                     # reference) side by side; 1: one after another in this process; None: torch's
                                     # thread count (the CLI's --threads)

    @property
    def resolved_synthesis(self) -> str:
        return self.synthesis or ("proxy" if self.resolved_public_fraction > 0 else "inversion")

    @property
    def resolved_public_fraction(self) -> float:
        """The records set aside as the server's public images: as given, else the preset's DP share with DP (unless a
        synthesis that reads no public images was asked for), else 0."""
        if self.public_fraction is not None:
            return self.public_fraction
        if self.synthesis is not None and self.synthesis not in PROXY_METHODS:
            return 0.0
        return self.resolved_preset().dp_public_fraction if self.dp_epsilon is not None else 0.0

    def __post_init__(self) -> None:
        if self.stop_after not in (None, "ingest"):
            raise ConfigError(f"the demo can stop after ingest, not {self.stop_after!r}", hint="--stop-after ingest")
        self.training_epsilon  # noqa: B018 -- refuse a budget the statistics take whole before anything is written
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"the demo's workers must be an integer >= 1, got {self.workers!r}", hint="--threads N")
        if self.size not in SIZES:
            raise ConfigError(f"image size {self.size!r} is not a MedMNIST+ size", hint=f"use one of {', '.join(map(str, SIZES))}")
        if self.preset_name == "paper" and self.size > LARGE_IMAGE and self.stop_after is None:
            raise ConfigError(f"the paper preset at {self.size} px starts the student from ImageNet weights, which the demo "
                              "does not take", hint="run the demo with --stop-after ingest, then the printed distill command "
                                                    "with --imagenet-weights FILE; or use another preset")

    def resolved_preset(self) -> DemoPreset:
        name = self.preset_name
        if name not in DEMO_PRESETS:
            raise ConfigError(f"unknown demo preset {self.preset!r}", hint=f"use auto or one of {', '.join(DEMO_PRESETS)}")
        preset = DEMO_PRESETS[name]
        if self.size != 28:   # the presets' architectures are 28 px ones
            preset = replace(preset, architecture=config_default_architecture(self.size))
        return replace(preset, sites=self.sites) if self.sites else preset

    @property
    def resolved_threshold_epsilon(self) -> float | None:
        """With DP on a binary task: the decision threshold's budget (given, or THRESHOLD_SHARE of dp_epsilon)."""
        if self.dp_epsilon is None or num_classes(self.flag) != 2:
            return None
        return self.threshold_epsilon if self.threshold_epsilon is not None else THRESHOLD_SHARE * self.dp_epsilon

    @property
    def resolved_stats_epsilon(self) -> float | None:
        """With DP: the DP feature statistics' budget (given, or STATS_SHARE of dp_epsilon)."""
        if self.dp_epsilon is None:
            return None
        return self.stats_epsilon if self.stats_epsilon is not None else STATS_SHARE * self.dp_epsilon

    @property
    def training_epsilon(self) -> float | None:
        """With DP: the classifier's budget (DP-SGD + label histogram + threshold): dp_epsilon less the statistics'.

        Raises:
            ConfigError: the statistics take the whole budget.
        """
        if self.dp_epsilon is None:
            return None
        left = self.dp_epsilon - (self.resolved_stats_epsilon or 0.0)
        if left <= 0:
            raise ConfigError(f"the DP feature statistics' epsilon {self.resolved_stats_epsilon:g} leaves nothing of "
                              f"dp_epsilon {self.dp_epsilon:g} for training", hint="lower --stats-epsilon")
        return left

    @property
    def server_epochs(self) -> int | None:
        """The distillation epochs the demo asks for: the preset's DP setting with DP, else None (the server preset's)."""
        return self.resolved_preset().dp_server_epochs if self.dp_epsilon is not None else None

    @property
    def resolved_workers(self) -> int:
        return self.workers if self.workers is not None else torch.get_num_threads()

    @property
    def preset_name(self) -> str:
        if self.preset != "auto":
            return self.preset
        return "gpu" if self.execution.torch_device.type == "cuda" else "cpu"


@dataclass
class DemoResult:
    out: Path
    metrics: dict[str, dict[str, float]]
    outcomes: list[BundleOutcome]
    distill: DistillRun | None       # None: stopped after ingest
    seconds: dict[str, float]
    paths: dict[str, str]


Say = Callable[[str], None]

# --- identities, trust, policies -----------------------------------------------------------------


def create_identities(run: Path, site_names: list[str]) -> tuple[dict[str, Identity], Path]:
    ids = {name: Identity.generate(name) for name in [*site_names, "server", "dpo"]}
    with warnings.catch_warnings():  # demo keys are unprotected on purpose (keys/README in the run says so)
        warnings.simplefilter("ignore", UnsafePlaintextKeyWarning)
        for identity in ids.values():
            save_identity(identity, run / "keys", None)
    roles = {"server": {"recipient"}, "dpo": {"approver"}}
    store = TrustStore()
    for name, identity in ids.items():
        store = store.with_entry(TrustEntry(identity.public, frozenset(roles.get(name, {"sender"})), note="demo identity"))
    save_trust_store(store, run / "keys" / "trust.toml")
    atomic_write_bytes(run / "keys" / "README.txt", b"Demo identities: the private keys are NOT passphrase-protected.\n"
                                                    b"Never use them for real data; create real ones with `secure-oneshot keys new`.\n")
    return ids, run / "keys" / "trust.toml"


def write_policies(run: Path, ids: dict[str, Identity], site_names: list[str]) -> tuple[Path, Path]:
    export_path, ingest_path = run / "policies" / "site-export.toml", run / "policies" / "server-ingest.toml"
    export_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(export_path, export_policy_text(ids).encode("ascii"))
    atomic_write_bytes(ingest_path, ingest_policy_text(ids, site_names).encode("ascii"))
    sign_policy(load_export_policy(export_path), export_path, ids["dpo"])
    return export_path, ingest_path


# --- sites ---------------------------------------------------------------------------------------


def demo_partition(cfg: DemoConfig, preset: DemoPreset, run: Path) -> Partition:
    # alpha -> infinity is the even split (studies write it "iid"); Partition ignores alpha there.
    scheme = "iid" if math.isinf(cfg.alpha) else "dirichlet"
    partition = Partition(n_sites=preset.sites, scheme=scheme, alpha=cfg.alpha if scheme == "dirichlet" else Partition.alpha, seed=cfg.seed,
                          public_fraction=cfg.resolved_public_fraction)
    splits = [load_medmnist(cfg.flag, s, root=cfg.data_root, size=cfg.size) for s in ("train", "val")]
    labels = np.concatenate([s.labels for s in splits])
    parts = partition_indices(labels, partition)
    public = public_indices(len(labels), partition)
    summary = {"flag": cfg.flag, "partition": partition.__dict__, "public_records": len(public),
               "sites": [{"site": i, "records": len(p), "label_counts": c} for i, (p, c) in
                         enumerate(zip(parts, label_counts(labels, parts, splits[0].n_classes)))]}
    atomic_write_bytes(run / "partition.json", (json.dumps(summary, indent=2) + "\n").encode("ascii"))
    if len(public):   # the server's public images (labels dropped): records no hospital holds
        images = np.concatenate([s.images for s in splits])[public]
        buffer = io.BytesIO()
        np.savez(buffer, images=images)
        public_images_path(run).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(public_images_path(run), buffer.getvalue())
    return partition


def public_images_path(run: Path) -> Path:
    return run / "server" / "public-images.npz"


def _data_config(cfg: DemoConfig, partition: Partition, site: int) -> DataConfig:
    return DataConfig(flag=cfg.flag, size=cfg.size, root=cfg.data_root, site=site, partition=partition)


def _site_config(cfg: DemoConfig, preset: DemoPreset, partition: Partition, i: int, name: str, run: Path) -> SiteConfig:
    stats = {"epsilon": cfg.resolved_stats_epsilon} if cfg.dp_epsilon is not None else None
    return SiteConfig(_data_config(cfg, partition, i), ClassifierConfig(preset.architecture), _site_train_config(cfg, preset, cfg.seed + i),
                      cfg.generator, stats, run / "sites" / name / "model")


def train_sites(cfg: DemoConfig, preset: DemoPreset, partition: Partition, names: list[str], run: Path, say: Say, *,
                workers: int = 1) -> list[Path]:
    """Train every hospital: one after another in this process (``workers`` 1), else in up to ``workers`` processes of
    one torch thread each, the largest first (client.parallel_sites: with one thread, the same model files bit for bit).
    One progress line per hospital, in the order they finish."""
    return _train_sites(cfg, preset, partition, names, run, say, workers, reference=False)[0]


def _train_sites(cfg: DemoConfig, preset: DemoPreset, partition: Partition, names: list[str], run: Path, say: Say, workers: int,
                 *, reference: bool) -> tuple[list[Path], dict[str, float] | None]:
    """:func:`train_sites`; with ``workers`` > 1 and ``reference``, the centralised reference is one more job of the pool."""
    configs = [_site_config(cfg, preset, partition, i, name, run) for i, name in enumerate(names)]
    if workers <= 1:
        for name, site_cfg in zip(names, configs):
            started = time.perf_counter()
            _say_site(say, name, site_summary(run_site(site_cfg), time.perf_counter() - started))
        return [c.out for c in configs], None
    records = _site_records(run, len(names))
    order = sorted(range(len(names)), key=lambda i: -records[i])   # longest first: the last job to start is a short one
    jobs = [(run_site_job, site_job(configs[i])) for i in order]
    labels = [names[i] for i in order]
    if reference:   # the pooled records: the largest job, so it starts first
        pooled = replace(partition, n_sites=1, scheme="iid")
        jobs.insert(0, (run_pooled_reference_job, pooled_reference_job(_data_config(cfg, pooled, 0), preset.train.val_fraction,
                                                                      preset.architecture, replace(preset.train, seed=cfg.seed))))
        labels.insert(0, "centralised reference")

    def done(index: int, result: dict[str, Plain]) -> None:
        if labels[index] == "centralised reference":
            say(f"  centralised reference (pooled records, research only): test ACC {result.get('acc', float('nan')):.3f} "
                f"AUC {result.get('auc', float('nan')):.3f}")
        else:
            _say_site(say, labels[index], result)

    results = run_jobs(jobs, workers, done)
    return [c.out for c in configs], (results[0] if reference else None)  # type: ignore[return-value]


def _say_site(say: Say, name: str, summary: dict[str, Any]) -> None:
    say(f"  {name}: {summary['records']} records, labels {summary['labels']}, "
        f"test ACC {summary['acc']:.3f} AUC {summary['auc']:.3f} ({summary['seconds']:.0f} s)")


def _site_records(run: Path, sites: int) -> list[int]:
    """Each hospital's record count from partition.json (demo_partition), to start the largest first; 0s without it."""
    try:
        return [int(s["records"]) for s in json.loads((run / "partition.json").read_text())["sites"]][:sites]
    except (OSError, ValueError, KeyError, TypeError):
        return [0] * sites


def export_all(names: list[str], model_dirs: list[Path], ids: dict[str, Identity], export_policy: Path, trust_file: Path,
               inbox: Path, run: Path, say: Say, without: frozenset[str] = frozenset()) -> list[Path]:
    """Each site's policy-checked export to the server; ``without``: artifacts every site leaves out (``export --without``)."""
    trust = load_trust_store(trust_file)
    inbox.mkdir(parents=True, exist_ok=True)
    delivered = []
    for name, model_dir in zip(names, model_dirs):
        site = run / "sites" / name
        (site / "outbox").mkdir(parents=True, exist_ok=True)
        request = ExportRequest(model_dir=model_dir, policy_path=export_policy, sender=ids[name], recipients=[ids["server"].public],
                                out=site / "outbox" / f"{name}.sob", audit_log=site / "audit.jsonl", trust=trust, without=without)
        report = export_model(request)
        assert report.bundle is not None  # not a dry run
        target = inbox / report.bundle.path.name
        shutil.copyfile(report.bundle.path, target)  # the "transfer": any channel will do, the bundle protects itself
        say(f"  {name}: {len(report.tensors)} tensors sealed to server, policy {report.policy.id} v{report.policy.version}")
        delivered.append(target)
    return delivered


def _tampered_copy(bundle: Path, inbox: Path) -> Path:
    """A copy of ``bundle`` with one ciphertext byte flipped, named to be ingested first (before its original,
    which would otherwise make it a replay instead of a forgery)."""
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    target = inbox / f"0-tampered-{bundle.name}"
    atomic_write_bytes(target, bytes(data))
    return target


# --- the server ----------------------------------------------------------------------------------


def _site_train_config(cfg: DemoConfig, preset: DemoPreset, seed: int) -> TrainConfig:
    """What a hospital trains with: the preset's recipe, with DP (and its releases) when ``cfg.dp_epsilon`` is set."""
    # DP sites release a DP label histogram; its prior drives the logit-adjusted loss (train.loss "auto").
    return replace(preset.dp_train if cfg.dp_epsilon is not None else preset.train, seed=seed,
                   dp_epsilon=cfg.training_epsilon, label_counts_epsilon=cfg.label_counts_epsilon if cfg.dp_epsilon is not None else None,
                   threshold_epsilon=cfg.resolved_threshold_epsilon)


def centralised_reference(cfg: DemoConfig, preset: DemoPreset, partition: Partition, *, private: bool = False) -> dict[str, float]:
    """Research-only reference: one model trained on every site's records pooled, evaluated on the test split.

    ``private=False`` trains it without DP (the demo's row); ``private=True`` with the hospitals' own recipe and
    budget (DP-SGD, label histogram and threshold within ``cfg.training_epsilon``) when ``cfg`` has DP, so that a
    privacy-utility curve compares like with like."""
    pooled = replace(partition, n_sites=1, scheme="iid")
    data = site_data(_data_config(cfg, pooled, 0), preset.train.val_fraction, cfg.seed)
    train = _site_train_config(cfg, preset, cfg.seed) if private else replace(preset.train, seed=cfg.seed)
    return pooled_reference(data, preset.architecture, train)


def metrics_table(metrics: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"  {'model':28s} {'ACC':>6s} {'AUC':>6s} {'bal.ACC':>8s}"]
    lines += [f"  {name:28s} {m['acc']:6.3f} {m['auc']:6.3f} {m['balanced_acc']:8.3f}" for name, m in metrics.items()]
    return lines


def run_demo(cfg: DemoConfig, say: Say = print) -> DemoResult:
    """Run the whole study (module docstring); ``say`` receives one progress line at a time."""
    with warnings.catch_warnings():
        warnings.simplefilter("once")  # Opacus and torch repeat the same warning for every site and step
        return _run_demo(cfg, say)


def _run_demo(cfg: DemoConfig, say: Say) -> DemoResult:
    preset = cfg.resolved_preset()
    run = cfg.out
    medmnist_file(cfg.flag, cfg.size, cfg.data_root)   # a missing data file is refused before anything is written
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"{run} already exists and is not empty", hint="choose another --out (each demo run gets its own folder)")
    run.mkdir(parents=True, exist_ok=True)
    names = [f"hospital-{i + 1}" for i in range(preset.sites)]
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    say(f"[1/6] identities for {len(names)} hospitals, the server and the dpo; signed policies")
    ids, trust_file = create_identities(run, names)
    export_policy, ingest_policy = write_policies(run, ids, names)
    lap("setup")
    threshold = f" + decision threshold {cfg.resolved_threshold_epsilon:g}" if cfg.resolved_threshold_epsilon else ""
    dp = (f", recipe dp, DP epsilon {cfg.dp_epsilon:g} in all: DP-SGD + label histogram {cfg.label_counts_epsilon:g}{threshold} "
          f"= {cfg.training_epsilon:g}, DP feature statistics {cfg.resolved_stats_epsilon:g}") if cfg.dp_epsilon else ""
    epochs = (preset.dp_train if cfg.dp_epsilon else preset.train).epochs
    say(f"[2/6] partition {cfg.flag} train+val among {len(names)} hospitals (Dirichlet alpha {cfg.alpha}); train each "
        f"({preset.architecture}, {epochs} epochs{dp})")
    partition = demo_partition(cfg, preset, run)
    workers = min(cfg.resolved_workers, preset.sites + 1)
    # Several workers: the centralised reference (step 6) is one more job of the sites' pool, so both cores stay busy.
    pooled_in_pool = cfg.centralised and workers > 1 and cfg.stop_after is None
    if workers > 1:
        say(f"  {workers} worker processes of one torch thread{' (with the centralised reference)' if pooled_in_pool else ''}; "
            "hospitals reported as they finish")
    model_dirs, reference = _train_sites(cfg, preset, partition, names, run, say, workers, reference=pooled_in_pool)
    lap("train")
    say("[3/6] export: policy check, sign, encrypt to the server, audit; deliver to the server inbox")
    server = IngestFolders.under(run / "server")
    delivered = export_all(names, model_dirs, ids, export_policy, trust_file, server.inbox, run, say)
    if cfg.tamper:
        tampered = _tampered_copy(delivered[0], server.inbox)
        say(f"  + a tampered copy of {delivered[0].name} ({tampered.name}): ingest must quarantine it")
    lap("export")
    say("[4/6] ingest: verify, decrypt, check the ingest policy; accept or quarantine")
    trust = load_trust_store(trust_file)
    outcomes = ingest_inbox(server, ids["server"], trust, load_ingest_policy(ingest_policy))
    for o in outcomes:
        say(f"  {o.outcome:11s} {o.file}{'  (' + o.error + ': ' + o.reason + ')' if o.error else ''}")
    lap("ingest")
    if cfg.stop_after == "ingest":   # the server half runs on its own: server_command(cfg), e.g. under torchrun
        return DemoResult(run, {}, outcomes, None, seconds, {"run": str(run), "server": str(server.root)})
    public = f", {cfg.resolved_synthesis} with {cfg.resolved_public_fraction:g} of the records as public images" \
        if cfg.resolved_public_fraction else ""
    epochs_note = f", {cfg.server_epochs} epochs (the demo's DP setting)" if cfg.server_epochs else ""
    say(f"[5/6] distil a global model from the accepted bundles (preset {preset.server}{epochs_note}{public}, "
        f"{cfg.execution.describe()['device']}, {cfg.execution.describe()['precision']})")
    sites = load_accepted(server.accepted, ids["server"], trust)
    test = to_dataset(load_medmnist(cfg.flag, "test", root=cfg.data_root, size=cfg.size))
    proxy = str(public_images_path(run)) if cfg.resolved_public_fraction > 0 else ""
    job = DistillJob(preset=preset.server, execution=cfg.execution, seed=cfg.seed, teacher_weighting=cfg.teacher_weighting,
                     image_size=cfg.size, class_evidence=cfg.class_evidence, epochs=cfg.server_epochs,
                     method=SynthesisMethod(cfg.resolved_synthesis), proxy_images=proxy if cfg.resolved_synthesis in PROXY_METHODS else "")
    run_result = run_distillation(sites, run / "server" / "global", job, test_set=test, progress=True,
                                  audit_to=(server.audit_log, ids["server"]))
    lap("distill")
    metrics = dict(run_result.metrics)
    if cfg.centralised:
        if reference is None:
            say("[6/6] centralised reference: the same training on all records pooled, without DP (research only)")
            reference = centralised_reference(cfg, preset, partition)
            lap("centralised")
        else:
            say("[6/6] centralised reference: trained with the hospitals in step 2 (all records pooled, without DP; research only)")
        metrics["centralised (pooled data, no DP)" if cfg.dp_epsilon is not None else "centralised (pooled data)"] = reference
    paths = {"run": str(run), "report": run_result.outputs["report.md"], "synthetic_images": run_result.outputs["synthetic.png"],
             "global_model": run_result.outputs["global.safetensors"], "server_audit_log": str(server.audit_log),
             "site_audit_logs": str(run / "sites" / "*" / "audit.jsonl"), "quarantine": str(server.quarantine)}
    _write_results(run, metrics, outcomes, seconds, paths, cfg, preset)
    return DemoResult(run, metrics, outcomes, run_result, seconds, paths)


def server_command(cfg: DemoConfig) -> list[str]:
    """The ``distill`` arguments that run step 5 of the demo in ``cfg.out`` on their own (after ``stop_after="ingest"``):
    the same job from the same accepted bundles, so the same global model (execution options are the caller's)."""
    run, server = cfg.out, cfg.out / "server"
    args = ["distill", "--server-dir", str(server), "--key", str(run / "keys" / "server.key"), "--trust",
            str(run / "keys" / "trust.toml"), "--preset", cfg.resolved_preset().server, "--seed", str(cfg.seed),
            "--synthesis", cfg.resolved_synthesis, "--eval", cfg.flag, "--out", str(server / "global")]
    if cfg.data_root:
        args += ["--data-root", cfg.data_root]
    if cfg.size != 28:
        args += ["--image-size", str(cfg.size)]
    if cfg.server_epochs:
        args += ["--epochs", str(cfg.server_epochs)]
    if cfg.teacher_weighting:
        args += ["--teacher-weighting", cfg.teacher_weighting]
    if cfg.class_evidence != "require":
        args += ["--class-evidence", cfg.class_evidence]
    if cfg.resolved_synthesis in PROXY_METHODS and cfg.resolved_public_fraction > 0:
        args += ["--proxy-images", str(public_images_path(run))]
    return args


def _write_results(run: Path, metrics: dict[str, dict[str, float]], outcomes: list[BundleOutcome], seconds: dict[str, float],
                   paths: dict[str, str], cfg: DemoConfig, preset: DemoPreset) -> None:
    summary = {"flag": cfg.flag, "preset": cfg.preset_name, "sites": preset.sites, "alpha": cfg.alpha, "seed": cfg.seed,
               "dp_epsilon": cfg.dp_epsilon, "stats_epsilon": cfg.resolved_stats_epsilon,
               "synthesis": cfg.resolved_synthesis, "public_fraction": cfg.resolved_public_fraction,
               "metrics": metrics, "outcomes": [o.__dict__ for o in outcomes], "seconds": seconds, "paths": paths,
               "selection": "last epoch; the test split is only evaluated"}
    atomic_write_bytes(run / "results.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    rows = metrics_markdown(metrics)
    public = f", {cfg.resolved_public_fraction:g} of the records as the server's public images" if cfg.resolved_public_fraction else ""
    text = (f"# secure-oneshot demo: {cfg.flag}, {preset.sites} hospitals, Dirichlet alpha {cfg.alpha}, preset {cfg.preset_name}"
            f"{public}, synthesis {cfg.resolved_synthesis}\n\n"
            + "\n".join(rows) + "\n\nThe global model is the last epoch's; the test split is only evaluated.\n")
    atomic_write_bytes(run / "results.md", text.encode("utf-8"))
    write_demo_report(run)  # report.html: the same results, releases, labels, synthesis and privacy position for reviewers


def summary_lines(result: DemoResult) -> list[str]:
    """The closing table and paths, for the CLI."""
    total = sum(result.seconds.values())
    return ["results (test split; the global model is the last epoch's, nothing selected on test):", *metrics_table(result.metrics),
            f"time: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in result.seconds.items())})",
            *(f"  {k:18s} {v}" for k, v in result.paths.items())]

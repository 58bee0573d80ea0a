"""``secure-oneshot experiment STUDY.toml``: a privacy-utility grid through the real pipeline, resumable.

A study config (see ``examples/study-quick-cpu.toml``)::

    [study]
    name = "quick-cpu"
    flags = ["pneumoniamnist"]
    sites = 3
    alphas = ["iid", 1.0, 0.1]     # Dirichlet concentrations over labels; "iid" = an even random split
    seeds = [0, 1, 2]
    data_root = "../shared/data/medmnist"   # optional (else --data-root / $SECURE_ONESHOT_DATA)
    size = 28                      # optional MedMNIST+ size: 28 | 64 | 128 | 224 (file <flag>_<size>.npz above 28 px;
                                   # the sites' default architecture and the server's images follow it)
    centralised = true             # optional: a reference trained on all records pooled, same recipe and epsilon
    public_fraction = 0.1          # optional: this fraction of the records goes to no hospital: the server's public
                                   # unlabelled images for the proxy methods (demo --public-fraction)

    [site]
    architecture = "small-cnn"     # optional: default small-cnn at 28 px, ResNet-18 above (models.specs)
    preset = "cpu"                 # a client.train preset (cells without DP)
    dp_preset = "dp"               # the preset of DP cells (default dp; "cpu" reproduces the untuned recipe)
    threshold_epsilon = 0.8        # optional: DP binary cells' decision-threshold budget (default a tenth of epsilon)
    epochs = 15                    # optional override (both presets)
    epsilons = ["inf", 8.0, 4.0]   # classifier DP-SGD grid; "inf" = no DP
    stats_epsilon = 0.8            # DP cells also release DP feature statistics at this budget, out of the cell's epsilon
                                   # (optional: default a tenth of it; the cell's epsilon covers every release)

    [generator]                    # optional: every site also trains a class-conditional diffusion generator
    preset = "cpu-small"           # a models.generator preset
    epochs = 3
    epsilons = ["inf", 8.0]        # the generator's own DP grid (separate from the classifier's)

    [policy]                       # what leaves the sites: the export policy allows every artifact, and
    withhold = [[], ["bn_statistics"]]   # each entry is one variant of what the sites leave out (export --without):
                                   # bn_statistics | dp_feature_statistics | generator

    [server]
    preset = "cpu"                 # a server.study preset
    methods = ["inversion"]        # inversion | generator | mixed (these two need [generator], not withheld)
                                   # | proxy | inversion+proxy (these two need proxy_images)
    proxy_images = { pneumoniamnist = "breastmnist:train" }   # per flag: a public set no hospital of that flag holds
                                   # (default with study.public_fraction: the records set aside)
    epochs = 16                    # optional override
    teacher_weighting = "equal"    # equal | label-counts | agreement | consensus (server.weighting; default: the
                                   # preset's, and consensus for the proxy methods, which hold public images)
    prior_matching = true          # optional (proxy methods): match the student's class prior after distillation
    site_recalibration = true      # optional: with consensus and every site's label counts, move each site's
                                   # decision point to the pooled counts' class shares first
    class_evidence = "require"     # optional: require (default) | report (server.class_evidence). A run refused
                                   # because no hospital's label counts show both sides of a class is a row too:
                                   # refused = 1, no model metrics; report distils it and records unsupported_classes
    student_init = "site"          # optional: random | site (server.student_init; default: site for the proxy
                                   # methods and for inversion outside the paper preset when the heaviest site
                                   # trained without DP, else random)

    [privacy_audit]
    enabled = true                 # loss-attack membership inference on every site model and the global model,
    shadows = 0                    # + offline LiRA with this many shadows per site; near-copies among synthetic images

Unknown tables and keys, and values of the wrong type, are refused when the file is read (every one listed
with its line), so a typo cannot silently change what a study measures.

Every cell (flag x alpha x classifier epsilon x generator epsilon x withheld artifacts x method) and seed
runs identities ->
partition -> train each site -> policy-checked signed encrypted export ->
ingest -> distil -> baselines on the test split (the last epoch's model; the
test split is only evaluated).  Site models are cached under
``OUT/cache/<key>`` and shared by cells that differ only in what is released or in the server side (so are
their privacy audits, kept beside each model);
each finished (cell, seed) writes ``OUT/cells/<id>/result.json`` atomically
and is skipped when the study runs again, so an interrupted study resumes
where it stopped.  Several processes can share one study folder (``shard=(k, n)``:
each runs its share of the runs; runs that share cached site models or a
centralised reference stay in one share).  ``results.csv`` / ``results.json``
(one row per cell and seed) and ``report.md`` (mean +- std over seeds) are
rewritten from the finished cells at the end; :mod:`~secure_oneshot.research.plots`
draws them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Subset

from .._internal.atomic import atomic_write_bytes
from ..client.train import PRESETS as TRAIN_PRESETS
from ..client.train import TrainConfig
from ..data import Partition, load_medmnist, to_dataset
from ..data.medmnist_data import medmnist_file
from ..demo import (DemoConfig, public_images_path, DemoPreset, centralised_reference, create_identities, demo_partition, export_all, train_sites,
                    write_policies)
from ..errors import ConfigError, EvidenceError
from ..keys import load_identity, load_trust_store
from ..keys.keyfile import UnsafePlaintextKeyWarning
from ..policy.load import load_ingest_policy
from ..server.execution import Execution
from ..server.ingest import IngestFolders, ingest_inbox
from ..server.sources import PROXY_METHODS, SynthesisMethod
from ..server.distributed import Distributed
from ..server.registry import server_lock
from ..server.study import DistillJob, load_accepted, run_distillation
from .study_config import Cell, Study, load_study, study_from_text
from .study_table import GROUP_FIELDS, METRICS, MODELS, ROW_FIELDS, Group, alpha_label, markdown_summary, summarise

__all__ = ["Study", "Cell", "Group", "alpha_label", "load_study", "study_from_text", "run_study", "summarise", "ROW_FIELDS",
           "GROUP_FIELDS"]

Say = Callable[[str], None]
def _site_setup(study: Study, cell: Cell, data_root: str | None) -> tuple[DemoConfig, DemoPreset]:
    train, dp_train = TRAIN_PRESETS[study.site_preset], TRAIN_PRESETS[study.site_dp_preset]
    if study.site_epochs is not None:
        train, dp_train = replace(train, epochs=int(study.site_epochs)), replace(dp_train, epochs=int(study.site_epochs))
    generator = None
    if cell.generator_epsilon is not None:
        generator = dict(study.generator or ())
        if not math.isinf(cell.generator_epsilon):
            generator["dp_epsilon"] = cell.generator_epsilon
    cfg = DemoConfig(out=Path("."), flag=cell.flag, data_root=data_root, sites=study.sites, alpha=cell.alpha, seed=cell.seed,
                     dp_epsilon=None if math.isinf(cell.epsilon) else cell.epsilon, stats_epsilon=study.stats_epsilon,
                     generator=generator, execution=Execution(), threshold_epsilon=study.threshold_epsilon,
                     public_fraction=study.public_fraction, size=study.size)
    return cfg, DemoPreset(study.sites, study.architecture, train, study.server_preset, dp_train)


def _train_key(train: TrainConfig) -> dict[str, Any]:
    """The training recipe for a cache key, without options left at the value that changes nothing (so the keys of
    sites cached before such an option existed stay valid)."""
    return {k: v for k, v in asdict(train).items() if not (k == "weight_standardisation" and v is False)}


def _cache_key(cfg: DemoConfig, preset: DemoPreset) -> str:
    """What determines the site models (not the server side)."""
    key = {"flag": cfg.flag, "alpha": cfg.alpha, "seed": cfg.seed, "dp": cfg.dp_epsilon, "stats": cfg.resolved_stats_epsilon,
           "sites": preset.sites, "architecture": preset.architecture, "train": _train_key(preset.train), "generator": cfg.generator}
    if cfg.public_fraction:   # (absent otherwise, so that the keys of studies without a public set stay as they were)
        key["public_fraction"] = cfg.public_fraction
    if cfg.size != 28:        # (the same for the image size)
        key["size"] = cfg.size
    if cfg.dp_epsilon is not None:  # the recipe DP sites actually train with
        key |= {"train": _train_key(preset.dp_train), "threshold": cfg.resolved_threshold_epsilon, "label_counts": cfg.label_counts_epsilon}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_sites(out: Path, cfg: DemoConfig, preset: DemoPreset, names: list[str], say: Say) -> list[Path]:
    folder = out / "cache" / _cache_key(cfg, preset)
    done = folder / "done.json"
    if done.is_file():
        return [Path(p) for p in json.loads(done.read_text())["models"]]
    folder.mkdir(parents=True, exist_ok=True)
    partition = demo_partition(cfg, preset, folder)
    dirs = train_sites(cfg, preset, partition, names, folder, say)
    atomic_write_bytes(done, json.dumps({"models": [str(d) for d in dirs]}).encode())
    return dirs


def centralised_row(out: Path, study: Study, cell: Cell, data_root: str | None) -> dict[str, float]:
    """``centralised_<metric>`` of one model trained on every record pooled, with the sites' recipe and epsilon
    (:func:`~secure_oneshot.demo.centralised_reference`), cached under ``OUT/cache/centralised-<key>.json``: the
    pooled records do not depend on the split, so every alpha of a (flag, epsilon, seed) shares it."""
    cfg, preset = _site_setup(study, cell, data_root)
    path = out / "cache" / f"centralised-{_cache_key(replace(cfg, alpha=math.inf), preset)}.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
    else:
        partition = Partition(n_sites=study.sites, scheme="iid", seed=cell.seed, public_fraction=study.public_fraction)
        metrics = centralised_reference(cfg, preset, partition, private=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(metrics).encode())
    return {f"centralised_{k}": float(metrics[k]) for k in METRICS if k in metrics}


def _epsilons(model_dirs: list[Path], withheld: tuple[str, ...]) -> dict[str, float | None]:
    """Largest classifier and generator epsilon, and the largest per-site epsilon composed over every DP artifact
    the site released (what it withheld does not count).  A site that released a model without DP has no
    composed guarantee: the composed column is then empty, not the epsilon of its other artifacts."""
    from ..policy.artifacts import load_model_dir
    from ..policy.dp import composed_epsilon

    per_artifact: dict[str, list[float]] = {"classifier": [], "generator": []}
    composed: list[float] = []
    for directory in model_dirs:
        released = load_model_dir(directory).without(set(withheld))
        records = released.dp
        for artifact, values in per_artifact.items():
            if artifact in records:
                values.append(records[artifact].epsilon)
        models = set(released.artifacts()) & set(per_artifact)
        private = bool(records) and models <= set(records)
        composed.append(composed_epsilon(list(records.values()), max(r.delta for r in records.values())) if private else math.inf)
    return {"epsilon_classifier_max": _largest(per_artifact["classifier"]), "epsilon_generator_max": _largest(per_artifact["generator"]),
            "epsilon_composed_max": _largest(composed)}


def _largest(values: list[float]) -> float | None:
    """The largest value; None when there is none or it is infinite (no such artifact / no DP guarantee)."""
    return max(values) if values and math.isfinite(max(values)) else None


def _cell_fields(cell: Cell) -> dict[str, Any]:
    """The grid fields of a run's row (GROUP_FIELDS and the seed)."""
    return {"flag": cell.flag, "alpha": "iid" if math.isinf(cell.alpha) else cell.alpha,
            "epsilon": "inf" if math.isinf(cell.epsilon) else cell.epsilon,
            "generator_epsilon": _csv_epsilon(cell.generator_epsilon), "withheld": "+".join(cell.withheld) or "none",
            "method": cell.method, "seed": cell.seed}


def _row(cell: Cell, metrics: dict[str, dict[str, float]], site_names: list[str], model_dirs: list[Path],
         bytes_sent: int, seconds: float) -> dict[str, Any]:
    row = _cell_fields(cell)
    sites = [metrics[n] for n in site_names if n in metrics]
    metrics = {MODELS["ensemble_equal"]: metrics.get(MODELS["ensemble"], {}), **metrics}
    for k in METRICS:
        row[f"sites_{k}"] = float(np.mean([m[k] for m in sites]))
        for short, name in list(MODELS.items())[1:]:
            row[f"{short}_{k}"] = metrics.get(name, {}).get(k, float("nan"))
    row.update(_epsilons(model_dirs, cell.withheld))
    row["bytes_transferred"], row["seconds"] = bytes_sent, round(seconds, 1)
    return row


def _refused_row(cell: Cell, refusal: EvidenceError, model_dirs: list[Path], bytes_sent: int, seconds: float) -> dict[str, Any]:
    """The row of a run whose distillation the class-evidence check refused: no model metrics (no model was made)."""
    row = {**_cell_fields(cell), "refused": 1, "unsupported_classes": len(refusal.data.get("unsupported_classes", []))}
    row.update(_epsilons(model_dirs, cell.withheld))
    row["bytes_transferred"], row["seconds"] = bytes_sent, round(seconds, 1)
    return row


def _csv_epsilon(epsilon: float | None) -> float | str:
    """How an epsilon grid value appears in rows: "inf" (no DP), "none" (no such artifact) or the number."""
    return "none" if epsilon is None else "inf" if math.isinf(epsilon) else epsilon


def _keys(out: Path, names: list[str]) -> tuple[dict[str, Any], Path, Path, Path]:
    """The study's identities and policies: created once, loaded again on resume.  Shards starting together on a
    new folder create them once: the first holds ``out/.lock`` while it writes, the others wait and load them."""
    keys = out / "keys"
    with server_lock(out, wait=True):
        if not (keys / "trust.toml").is_file():
            ids, trust = create_identities(out, names)
            export_policy, ingest_policy = write_policies(out, ids, names)
            return ids, trust, export_policy, ingest_policy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsafePlaintextKeyWarning)
        ids = {n: load_identity(keys / f"{n}.key", None) for n in [*names, "server", "dpo"]}
    return ids, keys / "trust.toml", out / "policies" / "site-export.toml", out / "policies" / "server-ingest.toml"


def run_cell(study: Study, cell: Cell, out: Path, data_root: str | None, say: Say) -> dict[str, Any]:
    """The whole pipeline for one cell; returns its row."""
    started = time.perf_counter()
    names = [f"hospital-{i + 1}" for i in range(study.sites)]
    ids, trust_file, export_policy, ingest_policy = _keys(out, names)
    cfg, preset = _site_setup(study, cell, data_root)
    model_dirs = _cached_sites(out, cfg, preset, names, say)
    run = out / "cells" / cell.id
    # A cell is run whole: what a stopped attempt left (bundles, ledger, a distillation checkpoint fingerprinted
    # with its bundles) is removed.  Finished cells never get here (run_study skips them); site models are cached.
    shutil.rmtree(run, ignore_errors=True)
    server = IngestFolders.under(run / "server")
    delivered = export_all(names, model_dirs, ids, export_policy, trust_file, server.inbox, run, say, without=frozenset(cell.withheld))
    bytes_sent = sum(p.stat().st_size for p in delivered)
    trust = load_trust_store(trust_file)
    outcomes = ingest_inbox(server, ids["server"], trust, load_ingest_policy(ingest_policy))
    refused = [o for o in outcomes if o.outcome != "accepted"]
    if refused:
        raise ConfigError(f"cell {cell.id}: ingest refused {[o.file for o in refused]}: {refused[0].reason}")
    test = to_dataset(load_medmnist(cell.flag, "test", root=data_root, size=study.size))
    job = DistillJob(preset=study.server_preset, seed=cell.seed, method=SynthesisMethod(cell.method), image_size=study.size,
                     epochs=int(study.server_epochs) if study.server_epochs is not None else None,
                     teacher_weighting=study.teacher_weighting, prior_matching=study.prior_matching,
                     site_recalibration=study.site_recalibration, class_evidence=study.class_evidence,
                     student_init=study.student_init,
                     proxy_images=_proxy_images(study, cell, out, data_root) if cell.method in PROXY_METHODS else "",
                     data_root=data_root)
    sites = load_accepted(server.accepted, ids["server"], trust)  # what the server holds: withheld artifacts are absent
    try:
        result = run_distillation(sites, run / "server" / "global", job, test_set=test, audit_to=(server.audit_log, ids["server"]))
    except EvidenceError as e:
        say(f"  refused: {e.message}")
        row = _refused_row(cell, e, model_dirs, bytes_sent, time.perf_counter() - started)
        if study.centralised:
            row.update(centralised_row(out, study, cell, data_root))
        return row
    row = _row(cell, result.metrics, names, model_dirs, bytes_sent, time.perf_counter() - started)
    evidence = result.report.get("class_evidence", {})
    row["refused"] = 0
    row["unsupported_classes"] = len(evidence["unsupported_classes"]) if evidence.get("judged") else None
    if study.centralised:
        row.update(centralised_row(out, study, cell, data_root))
    if study.privacy_audit:
        row.update(_membership(model_dirs, result.student, cell, data_root, study.audit_shadows, run / "audit", study.size))
        row.update(_synthetic_memorisation(sites, cell, data_root, result.synth))
    return row


def _proxy_images(study: Study, cell: Cell, out: Path, data_root: str | None) -> str:
    """The cell's public set: the one named for its flag, else the records its site partition set aside."""
    named = dict(study.proxy_images).get(cell.flag)
    if named:
        return named
    cfg, preset = _site_setup(study, cell, data_root)
    return str(public_images_path(out / "cache" / _cache_key(cfg, preset)))


def _synthetic_memorisation(sites: list[Any], cell: Cell, data_root: str | None, synth: Any) -> dict[str, float]:
    """Are the images the server synthesises near-copies of any site's records?  One fresh inversion batch
    (the run's settings and prior, 64 images) against the train split (which holds every site's records) and the
    test split.  (Generator samples are checked per site by the generator audit: ``generator_near_copies_max``.)"""
    from ..server.study import prior_options
    from ..server.synthesis import synthesize_batch
    from .memorisation import memorisation_report

    x, _ = synthesize_batch([s.model for s in sites], None, replace(synth, batch_size=64, seed=synth.seed + 10_000),
                            **prior_options(sites, student=None))
    train = to_dataset(load_medmnist(cell.flag, "train", root=data_root, size=synth.image_size)).tensors[0]
    test = to_dataset(load_medmnist(cell.flag, "test", root=data_root, size=synth.image_size)).tensors[0]
    report = memorisation_report(x.detach().cpu().clamp(-1, 1), train, test)
    return {"synthetic_near_copies": report.near_copies, "synthetic_median_ratio": report.median_ratio}


def _membership(model_dirs: list[Path], student: Any, cell: Cell, data_root: str | None, shadows: int, pages: Path,
                size: int = 28) -> dict[str, float]:
    """Loss-attack membership inference: each site model (and released generator) on its own records, and the
    global model on records of the train split (each held by some site) against the test split, with as many
    records of every class on both sides; with ``shadows``, offline LiRA against each site model too.  Each
    site's full audit is kept as ``pages/<site>.json`` and a DPIA page ``pages/<site>.md`` (+ the generator
    samples' closest pairs as ``<site>-closest-pairs.png``)."""
    from .membership import loss_attack
    from .privacy_audit import audit_model_dir, markdown_report, matched_candidates

    released_generator = cell.generator_epsilon is not None and "generator" not in cell.withheld
    pages.mkdir(parents=True, exist_ok=True)
    reports = []
    for directory in model_dirs:
        site = directory.parent.name  # cache/<key>/sites/<site>/model
        # The audit depends only on the (cached) site model and these settings, not on what the cell releases of
        # it or on the server side: cells sharing the site models share one audit, kept beside the model.
        cached = directory.parent / f"audit-s{cell.seed}-shadows{shadows}-generator{int(released_generator)}.json"
        cached_png = cached.with_suffix(".png")
        if cached.is_file():
            report = json.loads(cached.read_text())
        else:
            report = audit_model_dir(directory, data_root=data_root, seed=cell.seed, shadows=shadows, generator=released_generator,
                                     pairs_png=str(cached_png) if released_generator else None)
            atomic_write_bytes(cached, (json.dumps(report, indent=2) + "\n").encode())
        if released_generator and cached_png.is_file():  # the generator's samples beside their closest records
            atomic_write_bytes(pages / f"{site}-closest-pairs.png", cached_png.read_bytes())
        atomic_write_bytes(pages / f"{site}.json", (json.dumps(report, indent=2) + "\n").encode())
        atomic_write_bytes(pages / f"{site}.md", markdown_report(report).encode())
        reports.append(report)
    audits = [r["attacks"] for r in reports]
    sites = [a[0] for a in audits]
    lira = [a[1]["auc"] for a in audits if len(a) > 1]
    generators = [r["generator"] for r in reports if r["generator"]]
    pooled, test = (load_medmnist(cell.flag, split, root=data_root, size=size) for split in ("train", "test"))
    member_idx, non_member_idx = matched_candidates(pooled.labels, test.labels, np.random.default_rng(cell.seed))
    attack = loss_attack(student, Subset(to_dataset(pooled), member_idx.tolist()), Subset(to_dataset(test), non_member_idx.tolist()))
    return {"mia_sites_auc_max": max(a["auc"] for a in sites), "mia_sites_epsilon_max": max(a["epsilon_lower_bound"] for a in sites),
            "mia_global_auc": attack.auc, "lira_sites_auc_max": _largest(lira),
            "mia_generators_auc_max": _largest([g["membership"]["auc"] for g in generators]),
            "lira_generators_auc_max": _largest([g["attacks"][1]["auc"] for g in generators if len(g["attacks"]) > 1]),
            "generator_near_copies_max": _largest([g["memorisation"]["near_copies"] for g in generators])}


# --- the grid ------------------------------------------------------------------------------------


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """The runs of share ``k`` of ``n`` (1-based), in the study's order.  Runs with the same flag, epsilons and
    seed form one group (they share cached site models across what is released and the server side, and a
    centralised reference across alphas), so two shards never train the same models; the groups are dealt out
    in turn."""
    if shard is None:
        return cells
    k, n = shard
    groups: dict[tuple[Any, ...], int] = {}
    for cell in cells:
        groups.setdefault((cell.flag, cell.epsilon, cell.generator_epsilon, cell.seed), len(groups))
    return [c for c in cells if groups[(c.flag, c.epsilon, c.generator_epsilon, c.seed)] % n == k - 1]


def run_study(study: Study, out: Path, *, data_root: str | None = None, say: Say = print,
              max_cells: int | None = None, shard: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Run every unfinished (cell, seed), then rewrite results.csv / results.json / report.md.

    ``max_cells`` stops after that many newly computed cells (an interruption, for tests and for
    splitting a long study over several runs).  ``shard=(k, n)`` runs only share ``k`` of ``n``
    (:func:`shard_cells`), so that ``n`` processes can work on one folder at once; the results and report
    cover every run finished so far, whichever process ran it.

    Raises:
        ConfigError: launched under torchrun with several ranks (every rank would run and write every cell).
    """
    if Distributed.from_env().active:
        raise ConfigError("a study runs as one process, not under torchrun with several ranks",
                          hint="run `secure-oneshot experiment` as one process; for one configuration's server half on several "
                               "GPUs: `secure-oneshot demo --stop-after ingest`, then the torchrun command it prints (README)")
    data_root = data_root or study.data_root
    for flag in study.flags:   # a missing data file is refused before anything is written
        medmnist_file(flag, study.size, data_root)
    out.mkdir(parents=True, exist_ok=True)
    cells = study.cells()
    mine = shard_cells(cells, shard)
    computed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        for i, cell in enumerate(mine, 1):
            result_file = out / "cells" / cell.id / "result.json"
            if result_file.is_file():
                say(f"[{i}/{len(mine)}] {cell.id}: done earlier, skipped")
                _add_centralised(study, cell, out, data_root, result_file, say)
                continue
            if max_cells is not None and computed >= max_cells:
                say(f"stopping after {computed} new cell(s) (max_cells); run again to resume")
                break
            say(f"[{i}/{len(mine)}] {cell.id}")
            row = run_cell(study, cell, out, data_root, say)
            atomic_write_bytes(result_file, (json.dumps(row, indent=2) + "\n").encode())
            computed += 1
    rows = [json.loads(p.read_text()) for c in cells if (p := out / "cells" / c.id / "result.json").is_file()]
    write_results(out, study, rows)
    return rows


def _add_centralised(study: Study, cell: Cell, out: Path, data_root: str | None, result_file: Path, say: Say) -> None:
    """A run finished before ``[study] centralised`` was switched on gets its reference now (the row is rewritten)."""
    row = json.loads(result_file.read_text())
    if study.centralised and "centralised_auc" not in row:
        say(f"  centralised reference for {cell.id}")
        row.update(centralised_row(out, study, cell, data_root))
        atomic_write_bytes(result_file, (json.dumps(row, indent=2) + "\n").encode())


def write_results(out: Path, study: Study, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    atomic_write_bytes(out / "results.json", (json.dumps({"study": asdict(study), "rows": rows}, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown_summary(study, rows).encode())

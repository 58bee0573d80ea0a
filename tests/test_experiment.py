"""A tiny privacy-utility study through the real pipeline (2 sites, 1 seed, epsilon inf and 8), interrupted
after one run and resumed; its CSV, report and plots."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from secure_oneshot import audit
from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError
from secure_oneshot.keys import load_public
from secure_oneshot.research.experiment import study_from_text

from .data_helpers import thinned_root
from .test_data_root import data_root  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TINY = """
[study]
name = "tiny"
flags = ["pneumoniamnist"]
sites = 2
alphas = [0.5]
seeds = [0]
centralised = true

[site]
architecture = "small-cnn"
preset = "cpu"
epochs = 2
epsilons = ["inf", 8.0]
stats_epsilon = 1.0

[server]
preset = "smoke"
methods = ["inversion"]
epochs = 1
class_evidence = "report"   # 2 tiny hospitals: their counts cannot clear the noise, and these tests need both models

[privacy_audit]
enabled = true
"""


@pytest.fixture(scope="module")
def study_run(data_root, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("study")
    data_root = thinned_root(data_root, folder / "data", "pneumoniamnist", every=8)
    config = folder / "study.toml"
    config.write_text(TINY)
    out = folder / "out"
    # One torch thread: the CLI's default is a thread per core, as in use; beside the other test worker that only adds waiting.
    args = ["--json", "experiment", str(config), "--out", str(out), "--data-root", str(data_root), "--threads", "1"]
    assert main([*args, "--max-cells", "1"]) == 0  # "interrupted" after one run
    first = json.loads((out / "results.json").read_text())["rows"]
    finished = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    assert main(args) == 0
    return out, first, finished


def test_resume_does_not_recompute_a_finished_cell(study_run) -> None:
    out, first, finished = study_run
    assert len(first) == 1 and len(finished) == 1
    (path, mtime), = finished.items()
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 and rows[0] == first[0]


def test_every_cell_really_sealed_and_opened_its_bundles(study_run) -> None:
    out, _, _ = study_run
    server_key = load_public(out / "keys" / "server.pub")
    for cell in ("pneumoniamnist-a0.5-epsinf-inversion-s0", "pneumoniamnist-a0.5-eps8-inversion-s0"):
        log = audit.verify_log(out / "cells" / cell / "server" / "audit.jsonl", server_key)
        assert [r.event.action for r in log] == ["ingest", "ingest", "distill"] and all(r.event.outcome == "ok" for r in log)
        for site in ("hospital-1", "hospital-2"):
            (export,) = audit.verify_log(out / "cells" / cell / "sites" / site / "audit.jsonl", load_public(out / "keys" / f"{site}.pub"))
            assert export.event.action == "export" and export.event.bundle_id in {r.event.bundle_id for r in log}


def test_csv_report_and_plots_agree(study_run) -> None:
    out, _, _ = study_run
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epsilon"] for r in rows] == ["inf", "8.0"]
    dp = rows[1]
    # the cell's epsilon covers every release: the classifier's (DP-SGD, label histogram, threshold) and the statistics'
    assert float(dp["epsilon_classifier_max"]) <= 7.0 + 1e-6 < float(dp["epsilon_composed_max"]) <= 8.0 + 1e-6
    assert rows[0]["epsilon_classifier_max"] == "" and int(rows[0]["bytes_transferred"]) > 0
    # the class-evidence finding: not judged without label counts; with them, the distillation report's count
    # (whether the tiny hospitals' counts clear their noise depends on the noise drawn)
    evidence = json.loads((out / "cells" / "pneumoniamnist-a0.5-eps8-inversion-s0" / "server" / "global" / "report.json")
                          .read_text())["class_evidence"]
    assert evidence["judged"] and evidence["choice"] == "report"
    assert [(r["refused"], r["unsupported_classes"]) for r in rows] == [("0", ""), ("0", str(len(evidence["unsupported_classes"])))]
    # the centralised reference: one pooled model per (flag, epsilon, seed), trained once and cached
    assert all(0 <= float(r["centralised_auc"]) <= 1 and 0 <= float(r["centralised_acc"]) <= 1 for r in rows)
    assert len(list((out / "cache").glob("centralised-*.json"))) == 2
    assert all(0 <= float(r["ensemble_equal_acc"]) <= 1 for r in rows)
    assert all(0 <= float(r["mia_sites_auc_max"]) <= 1 and 0 <= float(r["mia_global_auc"]) <= 1 for r in rows)
    assert all(int(r["synthetic_near_copies"]) == 0 and float(r["synthetic_median_ratio"]) > 0 for r in rows)
    assert all(r["lira_sites_auc_max"] == "" for r in rows)  # shadows = 0 in this study
    for row in rows:  # each site's full audit is kept as JSON and as a DPIA page; the row holds the worst site's AUC
        audit_dir = out / "cells" / f"pneumoniamnist-a0.5-eps{'inf' if row['epsilon'] == 'inf' else '8'}-inversion-s0" / "audit"
        reports = [json.loads((audit_dir / f"hospital-{i}.json").read_text()) for i in (1, 2)]
        assert max(r["attacks"][0]["auc"] for r in reports) == pytest.approx(float(row["mia_sites_auc_max"]))
        assert (audit_dir / "hospital-1.md").read_text().startswith("# Privacy audit")
    report = (out / "report.md").read_text()
    for row in rows:  # the report's single-seed means are the CSV's numbers
        assert f"{float(row['global_auc']):.3f} +- 0.000" in report
    png = out / "plots" / "privacy-utility-pneumoniamnist-a0.5-inversion.png"  # a dotted alpha stays in the name
    svg = out / "plots" / "privacy-utility-pneumoniamnist-a0.5-inversion.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:2000]
    labels = sorted((out / "plots").glob("labels-*.png"))  # one per label split: the two DP settings share the partition
    assert [p.name for p in labels] == ["labels-pneumoniamnist-a0.5-s0.png"] and labels[0].read_bytes()[:4] == b"\x89PNG"
    trajectories = sorted(p.name for p in (out / "plots").glob("trajectory-*.png"))
    assert trajectories == ["trajectory-pneumoniamnist-a0.5-eps8-inversion.png", "trajectory-pneumoniamnist-a0.5-epsinf-inversion.png"]


def test_bad_study_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="epsilons"):
        study_from_text(TINY.replace('["inf", 8.0]', '["none"]'))
    with pytest.raises(ConfigError, match="server.methods"):
        study_from_text(TINY.replace('["inversion"]', '["magic"]'))
    assert math.isinf(study_from_text(TINY).epsilons[0])
    audited = study_from_text(TINY.replace("enabled = true", "enabled = true\nshadows = 2"))
    assert audited.privacy_audit and audited.audit_shadows == 2
    # each cell's epsilon covers every release: statistics that take all of one are refused when the config is read
    with pytest.raises(ConfigError, match="leaves nothing of epsilon 8"):
        study_from_text(TINY.replace("stats_epsilon = 1.0", "stats_epsilon = 8.0"))


def test_unknown_keys_and_wrong_types_in_a_study_are_refused_with_their_lines() -> None:
    # a typo or a quoted flag must not silently change what a study measures
    base = '[study]\nname = "s"\n[server]\nmethods = ["inversion"]\n'
    for extra, where in [("prior_matchng = false\n", "s.toml:5: server.prior_matchng: unknown key"),
                         ('[privacy_audit]\nenabled = "false"\n', "s.toml:6: privacy_audit.enabled: must be a boolean"),
                         ("[sites]\npreset = 'cpu'\n", "s.toml:5: sites: unknown key"),
                         ("[site]\nepsilon = [8.0]\n", "s.toml:6: site.epsilon: unknown key"),
                         ("[site]\nepochs = 0\n", "s.toml:6: site.epochs: must be at least 1")]:
        with pytest.raises(ConfigError, match=re.escape(where)):
            study_from_text(base + extra, "s.toml")
    with pytest.raises(ConfigError) as raised:
        study_from_text('[study]\nname = "s"\ncentralised = "no"\nsites = 0\nseeds = [0, 1.5]\n', "s.toml")
    assert str(raised.value).splitlines()[1:] == ["  s.toml:3: study.centralised: must be a boolean, got str 'no'",
                                                  "  s.toml:4: study.sites: must be at least 1, got 0",
                                                  "  s.toml:5: study.seeds: must be whole numbers, got [0, 1.5]"]
    with pytest.raises(ConfigError, match="study.name: missing"):
        study_from_text('[site]\npreset = "cpu"\n', "s.toml")


@pytest.mark.parametrize("name", ["study-quick-cpu.toml", "study-release-cpu.toml", "study-skew-cpu.toml", "study-paper-gpu.toml",
                                  "study-utility-cpu.toml", "study-public-cpu.toml"])
def test_example_studies_parse(name: str) -> None:
    from secure_oneshot.research.experiment import load_study

    study = load_study(Path(__file__).resolve().parents[1] / "examples" / name)
    assert study.cells() and len(study.seeds) >= 2


def test_iid_is_a_point_of_the_alpha_grid(tmp_path: Path) -> None:
    from secure_oneshot.research.experiment import GROUP_FIELDS, ROW_FIELDS, markdown_summary
    from secure_oneshot.research.plots import study_plots

    study = study_from_text(TINY.replace("alphas = [0.5]", 'alphas = ["iid", 0.5, 0.1]'))
    assert math.isinf(study.alphas[0]) and study.cells()[0].id == "pneumoniamnist-iid-epsinf-inversion-s0"
    with pytest.raises(ConfigError, match="study.alphas"):
        study_from_text(TINY.replace("alphas = [0.5]", 'alphas = ["skewed"]'))
    rows = []  # rows as run_study writes them, with made-up metrics: only the plotting and the report are tested here
    for i, (alpha, epsilon, seed) in enumerate((a, e, s) for a in ("iid", 0.5, 0.1) for e in ("inf", 8.0) for s in (0, 1)):
        row = {f: 0.5 + 0.01 * i for f in ROW_FIELDS[len(GROUP_FIELDS) + 1:]}
        rows.append({**row, "flag": "pneumoniamnist", "alpha": alpha, "epsilon": epsilon, "generator_epsilon": "none",
                     "withheld": "none", "method": "inversion", "seed": seed})
    names = sorted(p.name for p in study_plots(rows, tmp_path) if p.suffix == ".png")
    assert names == ["alpha-pneumoniamnist-eps8-inversion.png", "alpha-pneumoniamnist-epsinf-inversion.png",
                     "privacy-utility-pneumoniamnist-a0.1-inversion.png", "privacy-utility-pneumoniamnist-a0.5-inversion.png",
                     "privacy-utility-pneumoniamnist-iid-inversion.png"]
    assert "| pneumoniamnist | iid | inf |" in markdown_summary(study, rows)


def test_an_infinite_alpha_partitions_iid(tmp_path: Path, data_root) -> None:  # noqa: F811
    from secure_oneshot.demo import DEMO_PRESETS, DemoConfig, demo_partition

    partition = demo_partition(DemoConfig(out=tmp_path, data_root=str(data_root), alpha=math.inf), DEMO_PRESETS["smoke"], tmp_path)
    assert partition.scheme == "iid"
    counts = [s["records"] for s in json.loads((tmp_path / "partition.json").read_text())["sites"]]
    assert max(counts) - min(counts) <= 1


def test_a_study_without_the_centralised_reference_reports_none() -> None:
    """Runs of a study without ``centralised`` carry no such columns, so the report shows "-" (and plots draw no
    curve), never a NaN mean; with the columns, their mean is reported."""
    from secure_oneshot.research.experiment import GROUP_FIELDS, ROW_FIELDS, Cell, _row, markdown_summary, summarise

    metrics = {name: {"acc": 0.5, "auc": 0.5, "balanced_acc": 0.5} for name in
               ("site-a", "ensemble (teacher)", "fedavg (one-shot)", "global (distilled)")}
    row = _row(Cell("pneumoniamnist", 0.5, 8.0, "inversion", 0), metrics, ["site-a"], [], 1, 1.0)
    assert not any(f.startswith("centralised_") for f in row)  # distillation never reports it: no NaN columns
    assert row["ensemble_equal_acc"] == 0.5  # the equal teacher is the teacher when the run was not weighted
    cell = {"flag": "pneumoniamnist", "alpha": 0.5, "epsilon": 8.0, "generator_epsilon": "none", "withheld": "none",
            "method": "inversion"}
    base = {f: 0.5 for f in ROW_FIELDS[len(GROUP_FIELDS) + 1:] if not f.startswith("centralised_")}
    rows = [{**base, **cell, "seed": s} for s in (0, 1)]
    study = study_from_text(TINY)
    (stats,) = summarise(rows).values()
    assert stats["centralised_acc"][2] == 0 and stats["global_acc"] == (0.5, 0.0, 2)
    line = markdown_summary(study, rows).splitlines()[-1]
    assert "nan" not in line.lower()
    with_reference = [{**r, "centralised_acc": 0.8 + 0.02 * r["seed"]} for r in rows]
    assert "0.810 +- 0.010" in markdown_summary(study, with_reference)


def test_shards_split_the_runs_without_sharing_models() -> None:
    """Every run lands in exactly one share; runs with the same flag, epsilon and seed (which share cached site
    models and the centralised reference) land in the same one; the shares are within one group of each other."""
    from secure_oneshot.research.experiment import load_study, shard_cells

    cells = load_study(Path(__file__).resolve().parents[1] / "examples" / "study-utility-cpu.toml").cells()
    shares = [shard_cells(cells, (k, 3)) for k in (1, 2, 3)]
    assert sorted(c.id for share in shares for c in share) == sorted(c.id for c in cells)
    owner = {c.id: k for k, share in enumerate(shares) for c in share}
    for a in cells:
        for b in cells:
            if (a.flag, a.epsilon, a.seed) == (b.flag, b.epsilon, b.seed):
                assert owner[a.id] == owner[b.id]
    per_group = 2  # two alphas per (flag, epsilon, seed) in this study
    assert max(map(len, shares)) - min(map(len, shares)) <= per_group
    assert [c.id for c in shares[0]] == [c.id for c in cells if c in shares[0]]  # the study's order is kept
    assert shard_cells(cells, None) == cells == shard_cells(cells, (1, 1))


def test_run_study_runs_only_its_share_and_stops_after_max_cells(tmp_path: Path, data_root, monkeypatch) -> None:  # noqa: F811
    from secure_oneshot.research import experiment

    study = study_from_text(TINY.replace("seeds = [0]", "seeds = [0, 1, 2]").replace("[privacy_audit]\nenabled = true", ""))
    ran: list[str] = []

    def fake_run_cell(study, cell, out, data_root, say):
        ran.append(cell.id)
        (out / "cells" / cell.id).mkdir(parents=True)  # as the real run's folders
        return {"cell": cell.id}

    monkeypatch.setattr(experiment, "run_cell", fake_run_cell)
    monkeypatch.setattr(experiment, "write_results", lambda out, study, rows: None)
    monkeypatch.setattr(experiment, "centralised_row", lambda *a: {"centralised_auc": 0.5})
    rows = experiment.run_study(study, tmp_path, data_root=str(data_root), shard=(2, 2), say=lambda line: None)
    # groups in order: (inf, s0) (inf, s1) (inf, s2) (8, s0) (8, s1) (8, s2) -> share 2 of 2 holds the 2nd, 4th and 6th
    assert ran == ["pneumoniamnist-a0.5-epsinf-inversion-s1", "pneumoniamnist-a0.5-eps8-inversion-s0",
                   "pneumoniamnist-a0.5-eps8-inversion-s2"]
    assert len(rows) == 3
    ran.clear()
    rows = experiment.run_study(study, tmp_path, data_root=str(data_root), max_cells=2, say=lambda line: None)
    assert ran == ["pneumoniamnist-a0.5-epsinf-inversion-s0", "pneumoniamnist-a0.5-epsinf-inversion-s2"]
    assert len(rows) == 5  # the report covers every finished run, whichever share ran it


def test_shards_starting_together_create_one_set_of_keys(tmp_path: Path, monkeypatch) -> None:
    """Two processes on a new study folder: the second waits for the first's identities instead of writing its own
    (which would leave one process signing with keys the trust store does not hold)."""
    import threading
    import time

    from secure_oneshot.research import experiment

    real = experiment.create_identities

    def slow_create(out, names):
        created = real(out, names)
        time.sleep(0.3)  # a window in which an unlocked second caller would create another set
        return created

    monkeypatch.setattr(experiment, "create_identities", slow_create)
    names = ["hospital-1", "hospital-2"]
    results: list[str] = []

    def start() -> None:
        ids, _, _, _ = experiment._keys(tmp_path, names)
        results.append(ids["hospital-1"].key_id)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    on_disk = load_public(tmp_path / "keys" / "hospital-1.pub").key_id
    assert results == [on_disk, on_disk]


def test_a_bad_shard_is_a_usage_error(tmp_path: Path, capsys) -> None:
    config = tmp_path / "study.toml"
    config.write_text(TINY)
    for bad in ("3/2", "0/2", "1", "1/²", "-1/2"):
        with pytest.raises(SystemExit) as exit_info:
            main(["experiment", str(config), f"--shard={bad}"])
        assert exit_info.value.code == 2
        assert "is not a share K/N" in capsys.readouterr().err

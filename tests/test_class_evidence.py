"""The class-evidence check: a server that holds only one-class hospitals (by their released label counts) refuses to
distil, because no site model can rank the classes and the global model would rank by accident (the Dirichlet-0.1
study draw that gave 0.148 test AUC)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError, EvidenceError
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.research.experiment import _refused_row
from secure_oneshot.research.study_config import Cell
from secure_oneshot.research.study_table import markdown_summary
from secure_oneshot.server.class_evidence import EVIDENCE_Z, check_class_evidence, class_evidence
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.site_models import SiteModel, label_count_noise, load_model_dirs
from secure_oneshot.server.study import DistillJob, run_distillation

SIGMA = 35.0   # the label-count noise of the default release (noise multiplier 35, sensitivity 1)


def site(name: str, counts: list[float], noise: float = SIGMA, seed: int = 0) -> SiteModel:
    torch.manual_seed(seed)
    cfg = ClassifierConfig("small-cnn", 1, len(counts), "group")
    return SiteModel(name, build_classifier(cfg).eval(), cfg, label_counts=torch.tensor(counts), label_counts_noise=noise)


def one_class_hospitals() -> list[SiteModel]:
    """The released counts of the study's inverted draw (PneumoniaMNIST, Dirichlet 0.1, seed 1, epsilon 8)."""
    released = [[36, 737], [29, 826], [688, 30], [304, 50], [13, 1648]]
    return [site(f"hospital-{i + 1}", [float(v) for v in c], seed=i) for i, c in enumerate(released)]


def test_one_class_hospitals_support_no_class_and_a_two_class_one_supports_both() -> None:
    assert class_evidence(one_class_hospitals()).unsupported == [0, 1]
    sites = [*one_class_hospitals(), site("hospital-6", [527.0, 660.0])]
    evidence = class_evidence(sites)
    assert evidence.unsupported == [] and evidence.supporting == (("hospital-6",), ("hospital-6",))


def test_a_smaller_side_must_clear_z_sigma_of_the_counts_noise() -> None:
    just_below, just_above = EVIDENCE_Z * SIGMA - 1, EVIDENCE_Z * SIGMA + 1
    assert class_evidence([site("a", [just_below, 900.0])]).unsupported == [0, 1]
    assert class_evidence([site("a", [just_above, 900.0])]).unsupported == []
    # noise ten times smaller: the same 100 records now show
    assert class_evidence([site("a", [just_below, 900.0], noise=SIGMA / 10)]).unsupported == []


def test_exact_counts_need_one_record_each_side() -> None:
    assert class_evidence([site("a", [1.0, 50.0], noise=0.0)]).unsupported == []
    assert class_evidence([site("a", [0.0, 50.0], noise=0.0)]).unsupported == [0, 1]


def test_with_three_classes_the_rest_must_clear_its_summed_noise() -> None:
    """Class 2 against the rest: the rest is two noisy counts, so it needs Z * sigma * sqrt(2)."""
    rest = EVIDENCE_Z * SIGMA * math.sqrt(2) - 2
    assert class_evidence([site("a", [rest / 2, rest / 2, 900.0])]).unsupported == [0, 1, 2]
    # 2 records more on each: the rest clears its noise (class 2 shown); classes 0 and 1 alone stay under Z * sigma
    assert class_evidence([site("a", [rest / 2 + 2, rest / 2 + 2, 900.0])]).unsupported == [0, 1]


def test_the_rule_on_a_batch_of_released_counts_is_the_rule_per_site() -> None:
    """shows_both_sides over (draws, sites, classes), as benchmarks/class_evidence.py simulates noise draws with it."""
    from secure_oneshot.server.class_evidence import shows_both_sides

    batch = torch.tensor([[[36.0, 737.0], [527.0, 660.0]], [[110.0, 900.0], [0.0, 50.0]], [[60.0, 60.0], [900.0, 104.0]]],
                         dtype=torch.float64)
    shown = shows_both_sides(batch, SIGMA)
    for d in range(batch.shape[0]):
        for s_ in range(batch.shape[1]):
            evidence = class_evidence([site("a", batch[d, s_].tolist())])
            assert shown[d, s_].tolist() == [c not in evidence.unsupported for c in range(2)]
    assert shown.any(dim=1).all(dim=-1).tolist() == [True, True, False]


def test_it_cannot_judge_without_every_sites_counts_or_for_multi_label() -> None:
    sites = one_class_hospitals()
    sites[0].label_counts = None
    evidence = check_class_evidence(sites, "require")   # unknown: not refused
    assert evidence.supporting is None and "hospital-1" in evidence.reason and evidence.record()["judged"] is False
    multi = one_class_hospitals()
    multi[2].multi_label = True
    assert class_evidence(multi).supporting is None


def test_require_refuses_with_a_one_line_error_and_report_only_records() -> None:
    with pytest.raises(EvidenceError, match=r"both sides of class\(es\) 0, 1.*50 records, 1\.4 sigma") as refused:
        check_class_evidence(one_class_hospitals(), "require")
    assert refused.value.exit_code == 17 and "\n" not in refused.value.message and "--class-evidence report" in refused.value.hint
    assert refused.value.data["unsupported_classes"] == [0, 1]
    assert check_class_evidence(one_class_hospitals(), "report").unsupported == [0, 1]
    with pytest.raises(ConfigError, match="class-evidence"):
        check_class_evidence(one_class_hospitals(), "ignore")
    with pytest.raises(ConfigError, match="class-evidence"):
        DistillJob(class_evidence="ignore")


def test_the_noise_is_read_from_the_label_counts_record() -> None:
    record = {"history": [{"noise_multiplier": "35.0", "sample_rate": "1.0", "steps": 1}], "max_grad_norm": "1.0"}
    assert label_count_noise(record) == 35.0
    assert label_count_noise({**record, "max_grad_norm": "2.0"}) == 70.0
    assert label_count_noise(None) == 0.0
    # any other shape is not read as a small noise: nothing can show beyond it
    assert label_count_noise({**record, "history": record["history"] * 2}) == math.inf
    assert label_count_noise({**record, "history": [{**record["history"][0], "sample_rate": "0.1"}]}) == math.inf
    assert label_count_noise({"history": "x"}) == math.inf


def test_run_distillation_refuses_before_any_work_and_report_mode_distils_and_says_so(monkeypatch, tmp_path) -> None:
    import secure_oneshot.server.study as study

    monkeypatch.setitem(study.PRESETS, "tiny", ({"batch_size": 8, "steps": 2, "snapshot_every": 1, "bn_weight": 0.1}, {"epochs": 1}))
    test = TensorDataset(torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2)
    job = DistillJob(preset="tiny", execution=Execution(device="cpu"), teacher_weighting="equal")
    with pytest.raises(EvidenceError):
        run_distillation(one_class_hospitals(), tmp_path / "refused", job, test_set=test)
    assert not (tmp_path / "refused").exists()   # nothing written, not even a checkpoint
    job = DistillJob(preset="tiny", execution=Execution(device="cpu"), teacher_weighting="equal", class_evidence="report")
    run = run_distillation(one_class_hospitals(), tmp_path / "reported", job, test_set=test)
    assert run.report["class_evidence"] == {"choice": "report", "judged": True, "z": EVIDENCE_Z,
                                            "supporting_sites": [[], []], "unsupported_classes": [0, 1]}
    assert "**Class evidence: no site's released label counts show both sides of class(es) 0, 1**" in \
        (tmp_path / "reported" / "report.md").read_text()


def test_distill_command_exits_17_on_one_class_model_directories(tmp_path, capsys) -> None:
    """Two research model directories whose label counts (released as `train` releases them) show one class each."""
    from tests.model_helpers import make_real_model_dir
    from tests.test_label_counts import with_label_counts

    dirs = [with_label_counts(make_real_model_dir(tmp_path / f"site-{i}", bn=False), torch.tensor(counts))
            for i, counts in enumerate(([40.0, 2.0], [-3.0, 60.0]))]
    assert all(s.label_counts_noise > 10 for s in load_model_dirs(dirs))   # read from each directory's own record
    code = main(["distill", *[a for d in dirs for a in ("--model", str(d))], "--out", str(tmp_path / "global"), "--preset", "smoke"])
    err = capsys.readouterr().err
    assert code == 17 and "both sides of class(es) 0, 1" in err and "--class-evidence report" in err
    assert not (tmp_path / "global").exists()


def test_a_refused_run_is_a_row_without_model_metrics_and_the_table_counts_it() -> None:
    cell = Cell("pneumoniamnist", 0.1, 8.0, "proxy", 1)
    refusal = EvidenceError("refused", data={"unsupported_classes": [0, 1]})
    row = _refused_row(cell, refusal, [], 1000, 2.0)
    assert row["refused"] == 1 and row["unsupported_classes"] == 2 and "global_auc" not in row
    made = {**row, "seed": 0, "refused": 0, "unsupported_classes": 0, "global_auc": 0.9, "global_acc": 0.8}

    class Study:
        name, privacy_audit = "s", False

    table = markdown_summary(Study(), [made, row])
    header, rule, line = table.splitlines()[4:7]
    cells = dict(zip([h.strip() for h in header.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))
    assert cells["seeds"] == "1" and cells["refused"] == "1" and cells["global AUC"] == "0.900 +- 0.000"
    assert "refused" not in markdown_summary(Study(), [made]).splitlines()[4]

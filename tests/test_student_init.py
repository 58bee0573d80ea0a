"""Where the global student starts: random, or the released weights of the site with the largest share of the
teacher's weight (server.student_init), in the job, the command and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.site_models import SiteModel, use_batch_statistics
from secure_oneshot.server.sources import SynthesisMethod
from secure_oneshot.server.student_init import starting_site, start_student
from secure_oneshot.server.study import DistillJob

from .model_helpers import classifier_state, make_real_model_dir
from .test_proxy_images import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ClassifierConfig("small-cnn", 1, 2, "batch")


def site(name: str, cfg: ClassifierConfig = SMALL, seed: int = 0) -> SiteModel:
    torch.manual_seed(seed)
    return SiteModel(name, build_classifier(cfg), cfg)


def student(cfg: ClassifierConfig = SMALL) -> torch.nn.Module:
    torch.manual_seed(99)
    return build_classifier(cfg)


def test_the_site_with_the_largest_share_of_the_teacher_is_chosen_and_ties_go_to_the_first() -> None:
    sites = [site("a", seed=1), site("b", seed=2), site("c", seed=3)]
    weights = torch.tensor([[0.2, 0.1], [0.5, 0.6], [0.3, 0.3]])
    assert starting_site(sites, weights, SMALL, student()) == (1, pytest.approx(0.55))
    assert starting_site(sites, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), SMALL, student())[0] == 0
    assert starting_site(sites, None, SMALL, student()) == (0, pytest.approx(1 / 3))   # equal weights: the first site


def test_sites_the_student_cannot_start_from_are_skipped() -> None:
    group = ClassifierConfig("small-cnn", 1, 2, "group")
    sites = [site("gn", group, seed=1), site("bn", seed=2)]
    weights = torch.tensor([[0.9, 0.9], [0.1, 0.1]])
    assert starting_site(sites, weights, SMALL, student())[0] == 1     # the heavier GroupNorm site cannot seed a BN student
    assert starting_site(sites[:1], weights[:1], SMALL, student()) is None
    withheld = site("no-running-stats", seed=3)   # a BatchNorm site whose running statistics stayed at the site
    use_batch_statistics(withheld.model, [k for k in withheld.model.state_dict() if k.endswith("running_mean")])
    assert starting_site([withheld, sites[1]], weights, SMALL, student())[0] == 1


def test_starting_from_a_site_copies_its_weights_exactly() -> None:
    sites = [site("a", seed=1), site("b", seed=2)]
    model = student()
    start = start_student(model, "site", sites, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), SMALL, explicit=True)
    assert start.record() == {"kind": "site", "site": "b", "teacher_weight_share": 1.0}
    for name, tensor in sites[1].model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    untouched = student()
    assert start_student(untouched, "random", sites, None, SMALL, explicit=True).kind == "random"
    fresh = student().state_dict()
    assert all(torch.equal(tensor, fresh[name]) for name, tensor in untouched.state_dict().items())


def test_an_impossible_site_start_is_an_error_when_asked_for_and_a_note_by_default() -> None:
    sites = [site("gn", ClassifierConfig("small-cnn", 1, 2, "group"))]
    with pytest.raises(ConfigError, match="cannot start the student from a site"):
        start_student(student(), "site", sites, None, SMALL, explicit=True)
    start = start_student(student(), "site", sites, None, SMALL, explicit=False)
    assert start.kind == "random" and "architecture" in start.note


def test_by_default_a_dp_trained_site_is_not_a_starting_point_unless_asked_for() -> None:
    sites = [site("dp", seed=1), site("plain", seed=2)]
    sites[0].dp_classifier = True
    weights = torch.tensor([[0.7, 0.7], [0.3, 0.3]])
    model = student()
    start = start_student(model, "site", sites, weights, SMALL, explicit=False)
    assert start.kind == "random" and "dp" in start.note and "DP" in start.note
    fresh = student().state_dict()
    assert all(torch.equal(tensor, fresh[name]) for name, tensor in model.state_dict().items())
    assert start_student(student(), "site", sites, weights, SMALL, explicit=True).site == "dp"


def test_the_job_resolves_and_checks_the_start() -> None:
    assert DistillJob(method=SynthesisMethod("proxy"), proxy_images="x").student_start == "site"
    assert DistillJob(method=SynthesisMethod("inversion+proxy"), proxy_images="x").student_start == "site"
    assert DistillJob().student_start == "site"     # data-free inversion, cpu preset: measured better from a site
    assert DistillJob(preset="smoke").student_start == "site"
    assert DistillJob(preset="paper").student_start == "random"   # the published method's random start
    assert DistillJob(method=SynthesisMethod("generator")).student_start == "random"   # not measured with a site start
    assert DistillJob(method=SynthesisMethod("mixed")).student_start == "random"
    assert DistillJob(imagenet_weights="w.safetensors").student_start == "random"
    assert DistillJob(method=SynthesisMethod("proxy"), proxy_images="x", student_init="random").student_start == "random"
    assert DistillJob(method=SynthesisMethod("proxy"), proxy_images="x", imagenet_weights="w.safetensors").student_start == "random"
    with pytest.raises(ConfigError, match="unknown student start"):
        DistillJob(student_init="best")
    with pytest.raises(ConfigError, match="not both"):
        DistillJob(student_init="site", imagenet_weights="w.safetensors")


def _distance(a: dict, b: dict) -> float:
    return sum(float(((a[k].astype("float64") - b[k].astype("float64")) ** 2).sum()) for k in b if k.endswith("weight"))


def test_distill_starts_from_the_heaviest_site_and_stays_near_it(tmp_path: Path) -> None:
    """The command's student starts from the site the report names: after a short run it is much nearer that site's
    weights than a randomly started student is."""
    models = []
    for k, name in enumerate("ab"):
        model = make_real_model_dir(tmp_path / f"site-{name}" / "model", site=f"site-{name}")
        save_file(classifier_state("batch", seed=10 + k)[0], model / "classifier.safetensors")   # two different sites
        models.append(model)
    for i in range(6):
        png(tmp_path / "public" / f"{i}.png", (28, 28), value=40 * i)
    base = ["--json", "distill", *[a for m in models for a in ("--model", str(m))], "--preset", "smoke", "--epochs", "1",
            "--synthesis", "proxy", "--proxy-images", str(tmp_path / "public"), "--teacher-weighting", "agreement",
            "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "from-site")]) == 0   # the default with public images
    assert main([*base, "--student-init", "random", "--out", str(tmp_path / "random")]) == 0
    report = json.loads((tmp_path / "from-site" / "report.json").read_text())
    start = report["student_init"]
    assert start["kind"] == "site" and start["site"] in ("site-a/model", "site-b/model")
    assert "started from " + start["site"] in (tmp_path / "from-site" / "report.md").read_text()
    assert json.loads((tmp_path / "random" / "report.json").read_text())["student_init"] == {"kind": "random"}
    chosen = load_file(str(tmp_path / start["site"] / "classifier.safetensors"))
    other = load_file(str(tmp_path / ({"site-a/model": "site-b/model", "site-b/model": "site-a/model"}[start["site"]])
                          / "classifier.safetensors"))
    from_site = load_file(str(tmp_path / "from-site" / "global.safetensors"))
    from_random = load_file(str(tmp_path / "random" / "global.safetensors"))
    assert _distance(from_site, chosen) < 0.1 * _distance(from_random, chosen)
    assert _distance(from_site, chosen) < 0.1 * _distance(from_site, other)


def test_the_sites_say_whether_their_classifier_trained_with_dp(tmp_path: Path) -> None:
    from secure_oneshot.server.site_models import load_model_dirs

    from .policy_helpers import dp_record

    plain = make_real_model_dir(tmp_path / "plain")
    private = make_real_model_dir(tmp_path / "private", dp={"classifier": dp_record()})
    assert [s.dp_classifier for s in load_model_dirs([plain, private])] == [False, True]

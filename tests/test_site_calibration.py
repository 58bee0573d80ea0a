"""Site recalibration: each site's decision point moved to the pooled label counts' class shares before consensus."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_oneshot.metrics import classification_metrics
from secure_oneshot.models.classifier import ClassifierConfig
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.site_calibration import check_fold, decision_offsets, recalibrated_sites
from secure_oneshot.server.site_models import SiteModel, load_model_dirs
from secure_oneshot.server.sources import SynthesisMethod
from secure_oneshot.server.study import DistillJob, run_distillation
from secure_oneshot.server.weighting import consensus_weights, pooled_logits
from tests.model_helpers import make_real_model_dir
from tests.test_consensus_weighting import public_images
from tests.test_proxy_images import png
from tests.test_teacher_weighting import MeanSign, images


def shifted(k: float, shift: float) -> MeanSign:
    """A site that ranks every image by its mean pixel (AUC 1) but whose decision point is moved by ``shift``:
    logits (shift, -shift) + k * mean * (-1, 1), so a large positive shift calls every public image class 0."""
    model = MeanSign(k)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([shift, -shift]))
    return model


def sites_of(models: list[torch.nn.Module], counts: list[list[float]] | None) -> list[SiteModel]:
    return [SiteModel(f"s{i}", m, ClassifierConfig("small-cnn", 1, 2),
                      label_counts=None if counts is None else torch.tensor(counts[i]))
            for i, m in enumerate(models)]


def test_offsets_move_every_site_to_the_target_shares_and_keep_its_ranking() -> None:
    x = public_images(128)
    models = [shifted(4.0, 10.0), shifted(2.0, -6.0), MeanSign(3.0)]
    logits = Ensemble(models, batched=False).per_site_logits(x)
    offsets = decision_offsets(logits, torch.tensor([0.25, 0.75]))
    moved = logits + offsets[:, None, :]
    positive = (moved.argmax(-1) == 1).float().mean(dim=1)
    assert torch.allclose(positive, torch.full((3,), 0.75), atol=1 / 128)
    assert (logits.argmax(-1) == 1).float().mean(dim=1)[0] == 0   # the first site called nothing positive before
    for before, after in zip(logits, moved):   # one offset per class: the ranking of the images is unchanged
        assert torch.equal(torch.argsort(before[:, 1] - before[:, 0]), torch.argsort(after[:, 1] - after[:, 0]))


class LoudPixel(torch.nn.Module):
    """A poor site: ranks by one corner pixel, with large logits, calling nearly every public image class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-10.0], [10.0]]))
            self.fc.bias.copy_(torch.tensor([-20.0, 20.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, :, 0, 0].reshape(-1, 1))


def test_a_teacher_that_collapsed_onto_one_near_constant_site_recovers_after_recalibration() -> None:
    """The utility study's failure at epsilon 2, seed 0, in small: two sites rank every image well but call every
    public image class 0; a poor, loud one calls nearly every image class 1.  No pair agrees beyond chance, the equal
    teacher follows the loud site, so the fixed point gives it all the weight.  At the federation's class shares
    the good sites agree with each other and carry the teacher."""
    x = public_images(128)
    models = [shifted(4.0, 10.0), shifted(3.0, 8.0), LoudPixel()]
    sites = sites_of(models, [[30.0, 30.0], [10.0, 14.0], [5.0, 3.0]])   # pooled: 45 / 47
    logits = Ensemble(models, batched=False).per_site_logits(x)
    assert (logits.argmax(-1) == 1).float().mean(dim=1)[:2].max() == 0
    plain = consensus_weights(logits)
    assert plain[:2].max() == 0 and plain[2].min() > 0.9
    copies, moved, calibration = recalibrated_sites(sites, logits, torch.tensor([45.0, 47.0]))
    recal = consensus_weights(moved)
    assert calibration.applied and torch.allclose(moved, Ensemble([s.model for s in copies], batched=False).per_site_logits(x), atol=1e-5)
    assert (recal[:2] > 0.5).all()
    labelled = torch.cat([images(64, -1.0, seed=21), images(64, +1.0, seed=22)])
    y = np.array([0] * 64 + [1] * 64)
    before = classification_metrics(y, pooled_logits(Ensemble(models, batched=False).per_site_logits(labelled), plain).softmax(-1).numpy())
    after = classification_metrics(y, pooled_logits(Ensemble([s.model for s in copies], batched=False).per_site_logits(labelled),
                                                    recal).softmax(-1).numpy())
    assert before["auc"] < 0.7 and before["balanced_acc"] < 0.6                  # measured: 0.612 / 0.516
    assert after["auc"] > before["auc"] + 0.2 and after["balanced_acc"] > 0.7    # measured: 0.870 / 0.773


def test_the_sent_models_are_left_as_they_are() -> None:
    models = [shifted(4.0, 10.0), MeanSign(2.0)]
    sites = sites_of(models, [[1.0, 1.0], [1.0, 1.0]])
    before = [m.fc.bias.clone() for m in models]
    logits = Ensemble(models, batched=False).per_site_logits(public_images(64))
    copies, _, calibration = recalibrated_sites(sites, logits, torch.tensor([1.0, 1.0]))
    assert calibration.applied and all(torch.equal(m.fc.bias, b) for m, b in zip(models, before))
    assert not torch.equal(copies[0].model.fc.bias, before[0]) and copies[0].name == "s0"


class NoLinearHead(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, m], dim=1)


def test_a_site_without_a_final_linear_layer_leaves_every_site_unchanged_with_the_reason() -> None:
    models = [MeanSign(2.0), NoLinearHead()]
    sites = sites_of(models, [[1.0, 1.0], [1.0, 1.0]])
    logits = Ensemble(models, batched=False).per_site_logits(public_images(64))
    copies, returned, calibration = recalibrated_sites(sites, logits, torch.tensor([3.0, 1.0]))
    assert copies is sites and torch.equal(returned, logits)
    assert not calibration.applied and "s1: no final linear layer" in calibration.reason


def test_a_fold_that_does_not_move_the_logits_by_the_offsets_is_refused() -> None:
    models = [shifted(4.0, 10.0), MeanSign(2.0)]
    sites = sites_of(models, [[1.0, 1.0], [1.0, 1.0]])
    logits = Ensemble(models, batched=False).per_site_logits(public_images(64))
    _, expected, calibration = recalibrated_sites(sites, logits, torch.tensor([1.0, 1.0]))
    assert check_fold(calibration, expected, expected + 1e-6).applied
    refused = check_fold(calibration, expected, expected + 0.5)
    assert not refused.applied and "do not come straight" in refused.reason and refused.shares_after == refused.shares_before


def _proxy_run(tmp_path: Path, name: str, counts: list[list[float]] | None, **job: object) -> dict:
    dirs = [make_real_model_dir(tmp_path / f"site-{c}", site=f"site-{c}") for c in "abc"]
    sites = load_model_dirs(dirs)
    for i, s in enumerate(sites):   # distinct heads, so the sites do not decide alike
        with torch.no_grad():
            for p in s.model.parameters():
                p.add_(0.05 * (i + 1) * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    if counts is not None:
        sites = [dataclasses.replace(s, label_counts=torch.tensor(c)) for s, c in zip(sites, counts)]
    if not (tmp_path / "public").exists():
        for i in range(16):
            png(tmp_path / "public" / f"{i:02d}.png", (28, 28), value=15 * i)
    biases = [s.model.state_dict()[k].clone() for s in sites for k in s.model.state_dict() if k.endswith("bias")]
    run_distillation(sites, tmp_path / name, DistillJob(preset="smoke", epochs=1, method=SynthesisMethod("proxy"),
                                                       proxy_images=str(tmp_path / "public"), teacher_weighting="consensus",
                                                       **job))
    after = [s.model.state_dict()[k] for s in sites for k in s.model.state_dict() if k.endswith("bias")]
    assert all(torch.equal(a, b) for a, b in zip(after, biases))   # the hospitals' models as they were sent
    return json.loads((tmp_path / name / "report.json").read_text())


def test_distillation_recalibrates_the_teachers_sites_when_every_site_released_counts(tmp_path: Path) -> None:
    report = _proxy_run(tmp_path, "with-counts", [[3.0, 1.0], [6.0, 2.0], [3.0, 1.0]])
    record = report["site_recalibration"]
    assert record["applied"] and record["target_shares"] == [0.75, 0.25]
    assert all(abs(after[1] - 0.25) <= 1 / 16 for after in record["decision_shares_after"])
    assert len(record["offsets"]) == 3
    assert "Site recalibration: before the consensus" in (tmp_path / "with-counts" / "report.md").read_text()
    assert _proxy_run(tmp_path, "no-counts", None)["site_recalibration"] is None
    assert _proxy_run(tmp_path, "off", [[3.0, 1.0]] * 3, site_recalibration=False)["site_recalibration"] is None


def test_the_distill_command_turns_recalibration_off_on_request(tmp_path: Path, monkeypatch) -> None:
    import secure_oneshot.server.study as study
    from secure_oneshot.cli import main
    from secure_oneshot.errors import ConfigError

    jobs: list[DistillJob] = []

    def capture(sites, out, job, **kwargs):
        jobs.append(job)
        raise ConfigError("captured")

    monkeypatch.setattr(study, "run_distillation", capture)
    model = make_real_model_dir(tmp_path / "site-a")
    for i in range(4):
        png(tmp_path / "public" / f"{i}.png", (28, 28), value=40 * i)
    base = ["distill", "--model", str(model), "--preset", "smoke", "--synthesis", "proxy", "--proxy-images",
            str(tmp_path / "public"), "--out", str(tmp_path / "g"), "--threads", "1"]
    assert main(base) == 3 and main([*base, "--no-site-recalibration"]) == 3
    assert [j.site_recalibration for j in jobs] == [True, False]


def test_a_study_turns_recalibration_off_in_its_server_section() -> None:
    from secure_oneshot.errors import ConfigError
    from secure_oneshot.research.experiment import study_from_text

    base = '[study]\nname = "r"\n'
    assert study_from_text(base).site_recalibration is True
    assert study_from_text(base + "[server]\nsite_recalibration = false\n").site_recalibration is False
    with pytest.raises(ConfigError, match="site_recalibration"):
        study_from_text(base + '[server]\nsite_recalibration = "no"\n')

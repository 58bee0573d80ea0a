"""Prior matching: the global model's per-class offsets fitted on public images to the teacher's mean prediction or
to the shares of the sites' pooled label counts, folded into its last layer; rankings (AUC) unchanged; which target a
run gets; the distill command's report and its opt-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from secure_oneshot.cli import main
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.errors import ConfigError
from secure_oneshot.server.class_prior import (FIT_TOLERANCE, PriorMatch, decision_shares, fit_class_offsets, fit_decision_shares,
                                               last_linear, match_class_prior, match_class_shares)
from secure_oneshot.server.site_models import SiteModel
from secure_oneshot.server.study import DistillJob
from secure_oneshot.server.teacher import pooled_label_counts, prior_target

from .model_helpers import make_real_model_dir
from .test_label_counts import with_label_counts
from .test_data_root import data_root  # noqa: F401
from .test_proxy_images import png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mean_probability(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=1).mean(dim=0)


@pytest.mark.parametrize("classes,scale", [(2, 1.0), (3, 4.0), (5, 25.0)])
def test_the_fitted_offsets_make_the_mean_probabilities_equal_the_teachers(classes: int, scale: float) -> None:
    g = torch.Generator().manual_seed(classes)
    student = torch.randn(400, classes, generator=g) * scale + torch.linspace(-2, 2, classes)   # confident and skewed
    teacher = torch.softmax(torch.randn(400, classes, generator=g) - torch.linspace(-1, 1, classes), dim=1)
    offsets = fit_class_offsets(student, teacher)
    assert (_mean_probability(student + offsets) - teacher.double().mean(dim=0)).abs().max() < FIT_TOLERANCE
    assert abs(offsets.mean().item()) < 1e-12
    # a constant on every logit changes no probability, so it changes no offset
    assert torch.allclose(fit_class_offsets(student + 7.0, teacher), offsets, atol=1e-8)


def test_a_student_that_already_matches_is_left_alone() -> None:
    logits = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    assert fit_class_offsets(logits, torch.softmax(logits, dim=1)).abs().max() < 1e-6


def _matched(norm: str, n: int, match) -> tuple[torch.Tensor, torch.Tensor, PriorMatch]:  # type: ignore[no-untyped-def]
    """An untrained small CNN's logits on ``n`` random images before and after ``match(model, images)``, and what it
    returned; checks that every margin moved by one constant (same order, same AUC)."""
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig("small-cnn", 1, 2, norm)).eval()
    images = torch.randn(n, 1, 28, 28)
    with torch.no_grad():
        before = model(images)
    result = match(model, images)
    with torch.no_grad():
        after = model(images)
    margin_before, margin_after = before[:, 1] - before[:, 0], after[:, 1] - after[:, 0]
    assert (margin_after - margin_before).std() < 1e-5
    return before, after, result


def test_the_offsets_are_folded_into_the_last_layer_and_keep_every_ranking() -> None:
    # a teacher that says class 1 far less often than this student
    target = torch.tensor([[0.8, 0.2]]).expand(200, 2)
    before, after, result = _matched("batch", 200, lambda model, images: match_class_prior(model, images, target))
    assert result.applied and result.images == 200
    assert torch.allclose(after - before, torch.tensor(result.offsets, dtype=after.dtype).expand_as(after), atol=1e-4)
    assert abs(result.after[0] - 0.8) < 1e-4 and abs(result.target_values[0] - 0.8) < 1e-6
    assert result.before[1] > 0.3   # the untrained student was far from the teacher's 0.2


@pytest.mark.parametrize("classes,scale", [(2, 0.3), (2, 20.0), (3, 1.0), (5, 4.0)])
def test_the_decision_offsets_give_the_label_count_shares(classes: int, scale: float) -> None:
    g = torch.Generator().manual_seed(classes)
    # unconfident (0.3: margins like a DP student's) or very confident, and skewed towards the last class
    student = torch.randn(600, classes, generator=g) * scale + torch.linspace(-1, 1, classes) * scale
    shares = torch.linspace(3, 1, classes)                 # the opposite skew: counts, not yet normalised
    offsets = fit_decision_shares(student, shares)
    target = shares.double() / shares.sum()
    assert (decision_shares(student) - target).abs().max() > 0.1          # far off before
    # as near as 600 images allow: two classes exactly (a quantile), more within a few images per class
    tolerance = 1.5 / 600 if classes == 2 else 0.02
    assert (decision_shares(student + offsets) - target).abs().max() <= tolerance
    assert abs(offsets.mean().item()) < 1e-9


def test_matching_the_label_count_shares_folds_offsets_that_keep_every_ranking() -> None:
    _, after, result = _matched("group", 300, lambda model, images: match_class_shares(model, images, torch.tensor([75.0, 225.0])))
    assert result.applied and result.target == "label_counts"
    assert result.target_values == pytest.approx([0.25, 0.75])
    assert abs(result.after[1] - 0.75) <= 1.5 / 300 and abs(result.before[1] - 0.75) > 0.05
    assert (decision_shares(after) - torch.tensor([0.25, 0.75], dtype=torch.float64)).abs().max() <= 1.5 / 300
    record = result.record()
    assert record["label_count_shares"] == pytest.approx([0.25, 0.75]) and "teacher_mean_probability" not in record


def _site(name: str, counts: list[float] | None) -> SiteModel:
    cfg = ClassifierConfig("small-cnn", 1, 2)
    return SiteModel(name, build_classifier(cfg).eval(), cfg, label_counts=None if counts is None else torch.tensor(counts))


def test_the_label_counts_are_the_target_only_when_every_site_released_them() -> None:
    both = [_site("a", [10.0, 30.0]), _site("b", [-3.0, 5.0])]      # a DP-noised count below 0 counts as 0
    assert prior_target(both, None) == "label_counts"
    assert pooled_label_counts(both).tolist() == [10.0, 35.0]
    one = [_site("a", [10.0, 30.0]), _site("b", None)]
    assert prior_target(one, None) == "teacher" and prior_target(both, "teacher") == "teacher"
    assert prior_target([_site("a", [-1.0, 0.0])], None) == "teacher"   # nothing to take shares of
    with pytest.raises(ConfigError, match="missing: b"):
        prior_target(one, "label_counts")
    with pytest.raises(ConfigError, match="sum to 0"):
        prior_target([_site("a", [-1.0, 0.0])], "label_counts")
    with pytest.raises(ConfigError, match="unknown prior-matching target"):
        DistillJob(prior_target="labels")


class _ScaledHead(nn.Module):
    """Logits that are not the last linear layer's output (doubled after it): a fold would move them by 2b."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.body(x)


def test_a_model_whose_logits_are_not_the_last_layer_is_left_unchanged_and_the_report_says_why() -> None:
    torch.manual_seed(0)
    model = _ScaledHead().eval()
    bias = model.body[1].bias.detach().clone()
    result = match_class_prior(model, torch.randn(50, 1, 4, 4), torch.tensor([[0.9, 0.1]]).expand(50, 2))
    assert not result.applied and "do not come straight" in result.reason
    assert torch.equal(model.body[1].bias, bias)
    no_linear = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Linear(3, 2, bias=False)).eval()
    assert last_linear(no_linear, 2) is None
    result = match_class_prior(no_linear, torch.randn(20, 1, 4, 4), torch.tensor([[0.5, 0.5]]).expand(20, 2))
    assert not result.applied and "no final linear layer" in result.reason


def _distill_command(models: list[Path], public: Path, images: int, root: Path) -> list[str]:
    """``--json distill`` of ``models`` (smoke preset, one epoch, proxy synthesis) on ``images`` grey public PNGs."""
    for i in range(images):
        png(public / f"{i}.png", (28, 28), value=240 * i // images)
    return ["--json", "distill", *[a for m in models for a in ("--model", str(m))], "--preset", "smoke", "--epochs", "1",
            "--synthesis", "proxy", "--proxy-images", str(public), "--threads", "1",
            "--eval", "pneumoniamnist", "--data-root", str(root)]


def test_distill_with_public_images_matches_the_prior_and_the_opt_out_keeps_the_trained_model(tmp_path: Path, data_root, capsys) -> None:  # noqa: F811
    models = [make_real_model_dir(tmp_path / f"site-{c}", site=f"site-{c}") for c in "ab"]
    common = _distill_command(models, tmp_path / "public", 12, data_root)
    assert main([*common[1:], "--out", str(tmp_path / "matched")]) == 0
    assert "prior matched on 12 public images: class offsets" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "plain"), "--no-prior-matching"]) == 0
    matched = json.loads((tmp_path / "matched" / "report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    record = matched["prior_matching"]
    assert record["applied"] and record["images"] == 12
    assert max(abs(a - t) for a, t in zip(record["student_mean_probability_after"], record["teacher_mean_probability"])) < 1e-4
    assert plain["prior_matching"] is None and "global (before prior matching)" not in plain["metrics"]
    # the same training run: the unmatched row of one is the other's global model; the ranking is untouched
    assert matched["metrics"]["global (before prior matching)"] == plain["metrics"]["global (distilled)"]
    assert matched["metrics"]["global (distilled)"]["auc"] == pytest.approx(plain["metrics"]["global (distilled)"]["auc"], abs=1e-9)
    assert "Prior matching: class offsets" in (tmp_path / "matched" / "report.md").read_text()


def test_a_study_turns_prior_matching_off_only_with_a_real_boolean() -> None:
    from secure_oneshot.research.study_config import study_from_text

    base = "[study]\nname = \"s\"\nflags = [\"pneumoniamnist\"]\npublic_fraction = 0.1\n[server]\nmethods = [\"proxy\"]\n"
    assert study_from_text(base, "s.toml").prior_matching is True
    assert study_from_text(base + "prior_matching = false\n", "s.toml").prior_matching is False
    with pytest.raises(ConfigError, match="s.toml:7: server.prior_matching: must be a boolean, got str 'no'"):
        study_from_text(base + 'prior_matching = "no"\n', "s.toml")


def test_distill_matches_the_pooled_label_count_shares_when_every_site_released_them(tmp_path: Path, data_root, capsys) -> None:  # noqa: F811
    models = [with_label_counts(make_real_model_dir(tmp_path / f"site-{c}", site=f"site-{c}"), torch.tensor(counts))
              for c, counts in (("a", [120.0, 360.0]), ("b", [240.0, 480.0]))]   # both sides clear the counts' noise
    common = _distill_command(models, tmp_path / "public", 40, data_root)
    assert main([*common[1:], "--out", str(tmp_path / "shares")]) == 0
    assert "(to the sites' pooled label counts)" in capsys.readouterr().out
    record = json.loads((tmp_path / "shares" / "report.json").read_text())["prior_matching"]
    assert record["applied"] and record["target"] == "label_counts"
    assert record["label_count_shares"] == pytest.approx([0.3, 0.7])
    assert abs(record["student_decision_shares_after"][1] - 0.7) <= 1.5 / 40
    assert "pooled label counts" in (tmp_path / "shares" / "report.md").read_text()
    assert main([*common, "--out", str(tmp_path / "teacher"), "--prior-target", "teacher"]) == 0
    assert json.loads((tmp_path / "teacher" / "report.json").read_text())["prior_matching"]["target"] == "teacher"

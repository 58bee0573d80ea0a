"""The DP label histogram (artifact ``label_counts``): calibrated noise, the logit-adjusted loss, and the export gate
(fail closed, structure, DP limits, composition) attacked with hand-built model directories."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secure_oneshot.client.export import export_model
from secure_oneshot.client.label_counts import (
    LabelRelease,
    LogitAdjustedLoss,
    calibrate_sigma,
    log_prior,
    noisy_label_counts,
    with_label_release,
)
from secure_oneshot.client.site import run_site
from secure_oneshot.client.site_config import site_config_from_text
from secure_oneshot.errors import ConfigError, PolicyViolationError, PrivacyError
from secure_oneshot.policy.artifacts import load_model_dir
from secure_oneshot.policy.dp import composed_epsilon, verify_claim

from .model_helpers import make_real_model_dir
from .policy_helpers import dp_record, load_cast
from .test_export import install_policy, request

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
CAST = load_cast()
FINGERPRINT = "sha256:site-a-train"   # dp_record()'s default: the classifier's records


def release(epsilon: float = 0.1, labels=(0,) * 70 + (1,) * 30, num_classes: int = 2, seed: int = 0) -> LabelRelease:
    return noisy_label_counts(labels, num_classes, epsilon, 1e-5, dataset_fingerprint=FINGERPRINT, rng=np.random.default_rng(seed))


# --- the mechanism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.1, 1.0])
def test_release_recomputes_to_its_requested_epsilon(epsilon: float) -> None:
    r = release(epsilon)
    assert verify_claim(r.record) == pytest.approx(r.record.epsilon)
    assert 0.9 * epsilon <= r.record.epsilon <= epsilon          # spends at most the budget, and not far below it
    (sigma, rate, steps), = r.record.history
    assert (rate, steps, r.record.max_grad_norm) == (1.0, 1, 1.0)  # one full-batch Gaussian step, sensitivity 1
    assert r.record.sampling == "fixed" and r.record.accountant == "prv" and r.record.dataset_fingerprint == FINGERPRINT
    assert r.counts.dtype == torch.float32 and tuple(r.counts.shape) == (2,)


def test_larger_epsilon_means_less_noise_and_the_noise_has_that_scale() -> None:
    sigmas = [calibrate_sigma(e, 1e-5) for e in (0.1, 1.0, 4.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    # 4000 classes with no records: the release is pure noise, whose spread must be the calibrated sigma.
    noise = release(1.0, labels=(), num_classes=4000).counts.double()
    assert float(noise.std()) == pytest.approx(sigmas[1], rel=0.05)
    assert abs(float(noise.mean())) < 4 * sigmas[1] / np.sqrt(4000)


def test_counts_are_the_true_histogram_plus_noise() -> None:
    labels = (0,) * 700 + (1,) * 250 + (2,) * 50
    noisy = release(1.0, labels=labels, num_classes=3).counts
    assert torch.allclose(noisy, torch.tensor([700.0, 250.0, 50.0]), atol=5 * calibrate_sigma(1.0, 1e-5))
    assert not torch.equal(noisy, torch.tensor([700.0, 250.0, 50.0]))


def test_default_noise_comes_from_os_entropy_not_a_seed() -> None:
    """A fixed default seed would let anyone regenerate the noise and subtract it."""
    draws = [noisy_label_counts([0, 1, 1], 2, 1.0, 1e-5, dataset_fingerprint=FINGERPRINT).counts for _ in range(2)]
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.parametrize("labels, epsilon, error", [
    ([0, 2], 1.0, ConfigError),        # label outside [0, num_classes)
    ([0, -1], 1.0, ConfigError),
    ([0, 1], 0.0, ConfigError),        # no budget is not a release
    ([0, 1], float("nan"), ConfigError),
    ([0, 1], 1e-9, PrivacyError),      # the accountant cannot certify it (noise out of the verifier's range)
])
def test_bad_inputs_are_refused(labels, epsilon: float, error: type) -> None:
    with pytest.raises(error):
        noisy_label_counts(labels, 2, epsilon, 1e-5, dataset_fingerprint=FINGERPRINT)


def test_classifier_record_composes_the_histogram_step() -> None:
    classifier = dp_record(accountant="prv", noise=1.0, rate=0.05, steps=300)
    joint = with_label_release(classifier, release(0.5))
    assert joint.history == classifier.history + release(0.5).record.history
    assert joint.epsilon > classifier.epsilon and verify_claim(joint) == pytest.approx(joint.epsilon)


# --- the loss --------------------------------------------------------------------------------------


def test_logit_adjusted_loss_is_cross_entropy_on_adjusted_logits() -> None:
    counts = torch.tensor([700.0, -20.0, 250.0])      # noisy: a negative count is clamped to 1
    prior = log_prior(counts)
    expected_prior = torch.tensor([700.0, 1.0, 250.0]) / 951.0
    assert torch.allclose(prior.exp(), expected_prior)
    logits, target = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    for tau in (1.0, 2.5):
        loss = LogitAdjustedLoss(prior, tau)
        assert torch.allclose(loss(logits, target), nn.functional.cross_entropy(logits + tau * prior, target))
        loss.reduction = "none"   # what Opacus's ghost clipping does to get per-sample losses
        assert torch.allclose(loss(logits, target), nn.functional.cross_entropy(logits + tau * prior, target, reduction="none"))


def test_uniform_prior_changes_nothing() -> None:
    logits, target = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    assert torch.allclose(LogitAdjustedLoss(log_prior(torch.tensor([40.0, 40.0])))(logits, target), nn.functional.cross_entropy(logits, target))


# --- the export gate ---------------------------------------------------------------------------------


def with_label_counts(model: Path, counts: torch.Tensor | None = None, *, meta: object = None, record=None) -> Path:
    """Add ``label_counts.safetensors`` and its record entries to a model directory."""
    r = release(0.1)
    save_file({"counts": r.counts if counts is None else counts}, model / "label_counts.safetensors")
    data = json.loads((model / "record.json").read_text())
    data["artifacts"]["label_counts"] = {"num_classes": 2} if meta is None else meta
    data["dp"]["label_counts"] = (record or r.record).to_json()
    (model / "record.json").write_text(json.dumps(data))
    return model


def strict_model(tmp_path: Path, **kwargs) -> Path:
    return with_label_counts(make_real_model_dir(tmp_path / "m", bn=False, dp={"classifier": dp_record()}), **kwargs)


def strict_policy(tmp_path: Path, edit=None) -> Path:
    return install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit=edit)


def denials(req) -> list[dict]:
    with pytest.raises((PolicyViolationError, PrivacyError)) as caught:
        export_model(req)
    return [d for d in caught.value.data["evaluation"]["decisions"] if not d["allowed"]]


def test_model_dir_classifies_the_histogram_by_structure(tmp_path: Path) -> None:
    candidate = load_model_dir(strict_model(tmp_path))
    assert candidate.artifacts()["label_counts"] == ["label_counts/counts"]
    assert candidate.classification.problems == [] and "label_counts" in candidate.dp


def test_policy_that_does_not_list_the_artifact_denies_it(tmp_path: Path) -> None:
    edit = {'label_counts = "allow-with-dp"                 # the DP label histogram; absent from [artifacts] = deny\n': ""}
    denied = denials(request(tmp_path, strict_model(tmp_path), strict_policy(tmp_path, edit)))
    assert any(d["kind"] == "artifact" and d["rule"] == "artifacts.label_counts" and d["reason"] == "denied by policy" for d in denied), denied
    assert {d["subject"] for d in denied if d["kind"] == "tensor"} == {"label_counts/counts"}
    assert not (tmp_path / "out.sob").exists()


def test_allowed_histogram_shows_its_epsilon_and_counts_in_the_composed_budget(tmp_path: Path) -> None:
    report = export_model(request(tmp_path, strict_model(tmp_path), strict_policy(tmp_path), dry_run=True))
    assert "label_counts/counts" in report.tensors
    eps = report.epsilons
    assert 0.09 <= eps["label_counts"] <= 0.1
    composed = eps[f"composed:{FINGERPRINT}"]
    alone = composed_epsilon([dp_record()], 1e-5 * 2)   # the classifier alone at the same total delta
    assert composed > alone, (composed, alone)
    dp_rows = [d for d in report.evaluation.decisions if d.kind == "dp" and "label_counts" in d.subject]
    assert any(d.rule == "dp.composed.max_epsilon" and d.subject == "classifier+label_counts" for d in dp_rows), dp_rows
    assert any(d.rule == "dp.label_counts" and "0.0968" in d.reason for d in dp_rows), dp_rows


def test_histogram_over_its_epsilon_limit_is_refused(tmp_path: Path) -> None:
    loud = noisy_label_counts([0, 1], 2, 2.0, 1e-5, dataset_fingerprint=FINGERPRINT, rng=np.random.default_rng(0))
    denied = denials(request(tmp_path, strict_model(tmp_path, record=loud.record), strict_policy(tmp_path)))
    assert any(d["rule"] == "dp.label_counts.max_epsilon" for d in denied), denied


def test_histogram_without_dp_record_is_refused_by_allow_with_dp(tmp_path: Path) -> None:
    model = strict_model(tmp_path)
    data = json.loads((model / "record.json").read_text())
    del data["dp"]["label_counts"]
    (model / "record.json").write_text(json.dumps(data))
    denied = denials(request(tmp_path, model, strict_policy(tmp_path)))
    assert any(d["rule"] == "artifacts.label_counts" and "no DP record" in d["reason"] for d in denied), denied


@pytest.mark.parametrize("counts, meta, fragment", [
    (torch.zeros(3), None, "shape [3]"),                                   # more counts than classes
    (torch.zeros(2, dtype=torch.float64), None, "dtype F64"),
    (torch.zeros(3), {"num_classes": 3}, "differs from the declared classifier's 2"),
    (None, {"num_classes": "2; patient Jane"}, "artifacts.label_counts.num_classes"),
])
def test_histogram_that_does_not_fit_its_declaration_is_refused(tmp_path: Path, counts, meta, fragment: str) -> None:
    denied = denials(request(tmp_path, strict_model(tmp_path, counts=counts, meta=meta), strict_policy(tmp_path)))
    assert any(fragment in f"{d['subject']} {d['reason']}" for d in denied), denied


def test_histogram_without_its_metadata_is_an_unknown_tensor(tmp_path: Path) -> None:
    model = strict_model(tmp_path)
    data = json.loads((model / "record.json").read_text())
    del data["artifacts"]["label_counts"]
    (model / "record.json").write_text(json.dumps(data))
    assert load_model_dir(model).artifact_of("label_counts/counts") == "unknown"


# --- site config and the whole site job ------------------------------------------------------------


@pytest.mark.parametrize("train, fragment", [
    ('dp_epsilon = 8.0\nloss = "logit-adjusted"', "train.loss"),              # prior under DP must be a DP release
    ('dp_epsilon = 8.0\nlabel_counts_epsilon = 8.0', "train.label_counts_epsilon"),
    ('label_counts_epsilon = -0.1', "train.label_counts_epsilon"),
    ('loss = "focal"', "train.loss"),
    ('logit_adjust_tau = 0.0', "train.logit_adjust_tau"),
])
def test_site_config_refuses_inconsistent_label_settings(train: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        site_config_from_text(f"[train]\n{train}\n")


def tiny_npz(path: Path, counts=(120, 30), seed: int = 0) -> Path:
    """A MedMNIST-format file (pneumoniamnist layout) with an imbalanced, learnable signal."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, scale in (("train", 1.0), ("val", 0.2), ("test", 0.5)):
        labels = np.concatenate([np.full(int(c * scale), k) for k, c in enumerate(counts)])
        images = rng.normal(120, 30, size=(len(labels), 28, 28))
        images[labels == 1, 8:20, 8:20] += 60
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_dp_site_writes_the_histogram_and_its_classifier_record_includes_it(tmp_path: Path) -> None:
    text = f'''
[data]
file = "{tiny_npz(tmp_path / 'site.npz')}"
[train]
epochs = 1
dp_epsilon = 8.0
label_counts_epsilon = 0.5
[output]
dir = "{tmp_path / 'model'}"
'''
    cfg = site_config_from_text(text)
    assert cfg.train.loss == "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_site(cfg)
    counts = load_file(tmp_path / "model" / "label_counts.safetensors")
    assert list(counts) == ["counts"] and counts["counts"].dtype == torch.float32 and tuple(counts["counts"].shape) == (2,)
    record = json.loads((tmp_path / "model" / "record.json").read_text())
    assert record["artifacts"]["label_counts"] == {"num_classes": 2}
    assert run.classifier.config.loss == "logit-adjusted" and record["training"]["loss"]["kind"] == "logit-adjusted"
    assert "post-processing" in record["training"]["loss"]["prior"]
    histogram = run.classifier.label_counts.record
    classifier = run.classifier.dp
    assert classifier.history[-1] == histogram.history[0]          # the classifier's guarantee includes the prior
    assert classifier.epsilon <= 8.0 and verify_claim(classifier) == pytest.approx(classifier.epsilon)
    assert "balanced_acc" in run.classifier.metrics["test"]
    candidate = load_model_dir(tmp_path / "model")
    assert candidate.artifacts()["label_counts"] == ["label_counts/counts"] and candidate.classification.problems == []


def test_ce_site_keeps_its_classifier_record_free_of_the_histogram(tmp_path: Path) -> None:
    from secure_oneshot.client.train import site_data, train_classifier
    from secure_oneshot.client.train import PRESETS, DataConfig
    from secure_oneshot.models.classifier import ClassifierConfig

    data = site_data(DataConfig(file=str(tiny_npz(tmp_path / "s.npz"))))
    cfg = replace(PRESETS["cpu"], epochs=1, dp_epsilon=8.0, label_counts_epsilon=0.5, loss="ce")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_classifier(ClassifierConfig("small-cnn"), cfg, data)
    assert result.label_counts is not None and len(result.dp.history) == 1
    assert result.dp.history[0][1] < 1.0   # only DP-SGD's subsampled steps: the histogram did not touch this model


def test_logit_adjusted_dp_training_moves_the_boundary_towards_the_minority(tmp_path: Path) -> None:
    """Same data, seed and DP budget: CE's logits favour the 75% majority; the adjusted loss shifts them by about
    tau * log(prior ratio) (measured 4.0 for 4 * 1.1), so the model stops voting for the majority everywhere."""
    from secure_oneshot.client.train import DP_LOGIT_ADJUST_TAU, PRESETS, DataConfig, site_data, train_classifier
    from secure_oneshot.data import to_dataset
    from secure_oneshot.models.classifier import ClassifierConfig

    data = site_data(DataConfig(file=str(tiny_npz(tmp_path / "s.npz", counts=(300, 100)))))
    images, labels = to_dataset(data.test).tensors
    gaps = {}
    for loss in ("ce", "logit-adjusted"):
        cfg = replace(PRESETS["cpu"], epochs=3, dp_epsilon=8.0, label_counts_epsilon=0.5, loss=loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train_classifier(ClassifierConfig("small-cnn"), cfg, data)
        with torch.no_grad():
            logits = result.model.eval()(images)
        gaps[loss] = float((logits[:, 1] - logits[:, 0]).mean())   # > 0 leans to the minority class 1
        if loss == "logit-adjusted":
            assert result.config.logit_adjust_tau == DP_LOGIT_ADJUST_TAU
    assert gaps["ce"] < -1.0, gaps                                   # DP + CE: every record leans to the majority
    assert gaps["logit-adjusted"] - gaps["ce"] > 0.5 * DP_LOGIT_ADJUST_TAU * np.log(3), gaps

"""Site training on real PneumoniaMNIST: the CPU preset learns; DP-SGD keeps its budget; nothing is pickled;
train -> export yields a policy-checked bundle whose DP record verifies."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from secure_oneshot.bundle import open_bundle
from secure_oneshot.bundle.safetensors_strict import parse_payload
from secure_oneshot.client.export import ExportRequest, export_model
from secure_oneshot.client.site import run_site
from secure_oneshot.client.site_config import site_config_from_text
from secure_oneshot.client.train import PRESETS, DataConfig, site_data, train_classifier
from secure_oneshot.data import Partition
from secure_oneshot.models.classifier import ClassifierConfig, has_batchnorm
from secure_oneshot.policy.dp import DpRecord, compute_epsilon, verify_claim
from secure_oneshot.policy.load import load_export_policy
from secure_oneshot.policy.signatures import sign_policy

from .conftest import NOW
from .policy_helpers import POLICIES, load_cast
from .test_data_root import data_root  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def small_site(data_root):  # noqa: F811
    """Site 0 of a 10-site IID split: about 470 training records."""
    return site_data(DataConfig(root=str(data_root), site=0, partition=Partition(10, "iid")))


def test_cpu_preset_beats_majority_class(small_site) -> None:
    result = train_classifier(ClassifierConfig("small-cnn"), PRESETS["cpu"], small_site)
    test = result.metrics["test"]
    majority = max((small_site.test.labels == c).mean() for c in (0, 1))  # 0.625 on the official test split
    # Measured on seeds 0-2: AUC 0.946-0.960, ACC 0.830-0.843 with 470 records.
    assert test["auc"] >= 0.90, test
    assert test["acc"] >= majority + 0.1, (test, majority)
    assert result.dp is None and has_batchnorm(result.model)


DP_WARNINGS: list[str] = []   # what the dp_result training warned about


@pytest.fixture(scope="module")
def dp_result(small_site):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_classifier(ClassifierConfig("small-cnn"), replace(PRESETS["cpu"], epochs=3, dp_epsilon=4.0), small_site)
    DP_WARNINGS[:] = [str(w.message) for w in caught]
    return result


def test_dp_training_does_not_print_the_accountants_domain_chatter(dp_result) -> None:
    # Opacus's noise search sizes the PRV domain with an RDP bound that warns "Optimal order is the largest
    # alpha" for trial noise levels: about the domain, not the epsilon; it was printed twice per DP site
    assert dp_result.dp is not None
    assert not [m for m in DP_WARNINGS if "Optimal order" in m]


def test_dp_training_at_sample_rate_one_prints_no_numpy_warning(small_site) -> None:
    """A hospital with fewer records than the logical batch samples everything every step (q = 1), where
    Opacus's PRV analysis takes log(1 - q) = -inf on purpose; NumPy's "divide by zero" about it was printed
    in the middle of a study's site training."""
    cfg = replace(PRESETS["cpu"], epochs=1, dp_epsilon=8.0, batch_size=1024, max_physical_batch_size=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_classifier(ClassifierConfig("small-cnn"), cfg, small_site)
    (_, rate, _), = result.dp.history
    assert rate == 1.0
    assert not [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_dp_training_meets_its_budget_and_the_record_recomputes(dp_result) -> None:
    record = dp_result.dp
    assert record is not None and record.epsilon <= 4.0 + 1e-6
    assert record.sampling == "poisson" and record.accountant == "prv"
    assert abs(verify_claim(record) - record.epsilon) < 1e-6
    assert not has_batchnorm(dp_result.model)
    assert any(isinstance(m, nn.GroupNorm) for m in dp_result.model.modules())


def test_epsilon_grows_with_more_steps(dp_result) -> None:
    (sigma, rate, steps), = dp_result.dp.history
    more = compute_epsilon("prv", ((sigma, rate, 2 * steps),), dp_result.dp.delta)
    assert more > dp_result.dp.epsilon * 1.2


def _assert_no_pickle(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        raw = path.read_bytes()
        assert not raw.startswith((b"\x80", b"PK\x03\x04")), f"{path} looks like a pickle or torch.save zip"
        if path.suffix == ".safetensors":
            parse_payload(bytearray(raw))
        else:
            assert path.suffix == ".json", path
            json.loads(raw)


SITE_TOML = """
[data]
flag = "pneumoniamnist"
root = "{root}"
site = 1
n_sites = 10
[train]
preset = "cpu"
epochs = 2
dp_epsilon = 6.0
[output]
dir = "{out}"
"""


def test_train_then_export_gives_a_bundle_whose_dp_record_verifies(tmp_path: Path, data_root) -> None:  # noqa: F811
    cfg = site_config_from_text(SITE_TOML.format(root=data_root, out=tmp_path / "model"))
    run = run_site(cfg)
    _assert_no_pickle(run.out)
    cast = load_cast()
    policy = tmp_path / "research.toml"
    policy.write_text((POLICIES / "research-study.toml").read_text())
    sign_policy(load_export_policy(policy), policy, cast.dpo, NOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_model(ExportRequest(run.out, policy, cast.site, [cast.server.public], tmp_path / "site.sob",
                                            tmp_path / "audit.jsonl", cast.site_trust(), now=NOW))
    opened = open_bundle(report.bundle.path, cast.server, cast.server_trust(), now=NOW)
    record = DpRecord.from_json(opened.manifest.dp["classifier"], "manifest dp.classifier")
    assert record.epsilon <= 6.0 + 1e-6 and abs(verify_claim(record) - record.epsilon) < 1e-6
    assert all(name.startswith("classifier/") for name in opened.tensors)
    assert opened.manifest.meta["artifacts"]["classifier"]["architecture"] == "small-cnn"


def test_min_steps_raises_epochs_for_tiny_sites_only() -> None:
    from secure_oneshot.client.train import with_min_steps

    cfg = replace(PRESETS["cpu"], min_steps=150)  # 15 epochs, batch 64
    assert with_min_steps(cfg, 100).epochs == 75           # 2 steps per epoch
    assert with_min_steps(cfg, 850).epochs == 15           # 14 steps per epoch: 210 >= 150 already
    assert with_min_steps(PRESETS["cpu"], 10).epochs == 15  # off by default


def test_dp_preset_site_model_beats_the_majority_class(small_site) -> None:
    """The dp preset with its two releases, as the demo runs it at epsilon 8, on ~470 real records.

    Measured once before writing this (seed 0): test ACC 0.851, balanced ACC 0.835, AUC 0.926; the untuned
    recipe (cpu preset, logit-adjusted loss, no threshold) gave ACC 0.627, balanced ACC 0.50 on the same site.
    The histogram's and threshold's noise is pinned (``noise_rng``): with OS-entropy noise the balanced ACC of
    this site varies from draw to draw (0.689 was seen once), which is the recipe's spread, not a regression.
    """
    cfg = replace(PRESETS["dp"], dp_epsilon=8.0, label_counts_epsilon=0.1, threshold_epsilon=0.8)
    result = train_classifier(ClassifierConfig("small-cnn"), cfg, small_site, noise_rng=np.random.default_rng(0))
    test = result.metrics["test"]
    majority = max((small_site.test.labels == c).mean() for c in (0, 1))
    assert result.dp is not None and result.dp.epsilon <= 8.0
    assert test["acc"] >= majority + 0.10, (test, majority)
    assert test["balanced_acc"] >= 0.70, test

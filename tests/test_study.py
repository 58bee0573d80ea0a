"""Server study helpers: site models from model directories and bundles, FedAvg, and the baseline table."""

from __future__ import annotations

from pathlib import Path

import torch

import pytest

from secure_oneshot.client.train import classifier_state, write_model_dir
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server.study import SiteModel, baselines, fedavg, load_model_dirs

from .policy_helpers import make_model_dir


def _sites(n: int = 3) -> list[SiteModel]:
    cfg = ClassifierConfig("small-cnn", 1, 2)
    sites = []
    for i in range(n):
        torch.manual_seed(i)
        sites.append(SiteModel(f"site{i}", build_classifier(cfg).eval(), cfg))
    return sites


def test_fedavg_is_the_mean_of_the_weights() -> None:
    sites = _sites()
    average = fedavg([s.model for s in sites])
    name = "head.weight"
    expected = torch.stack([s.model.state_dict()[name] for s in sites]).mean(0)
    assert torch.allclose(average.state_dict()[name], expected)
    assert average.state_dict()["features.1.num_batches_tracked"].dtype == torch.int64


def test_baselines_report_every_row() -> None:
    sites = _sites()
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 28, 28), torch.arange(40) % 2)
    rows = baselines(sites, build_classifier(sites[0].config).eval(), data)
    assert list(rows) == ["site0", "site1", "site2", "ensemble (teacher)", "fedavg (one-shot)", "global (distilled)"]
    assert all(set(m) == {"acc", "auc", "balanced_acc"} for m in rows.values())


def test_site_models_from_model_directories_keep_their_weights(tmp_path: Path) -> None:
    (original,) = _sites(1)
    record = {"format": "secure-oneshot-model/v1", "site": "a", "dp": {},
              "artifacts": {"classifier": {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2, "norm": "batch"}}}
    write_model_dir(tmp_path / "a", {"classifier": classifier_state(original.model)}, record)
    (site,) = load_model_dirs([tmp_path / "a"])
    assert site.config == original.config and site.feature_stats is None
    assert all(torch.equal(v, original.model.state_dict()[k]) for k, v in site.model.state_dict().items())


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path: Path) -> None:
    make_model_dir(tmp_path / "b", bn=True)  # toy tensor names, not a small-cnn
    with pytest.raises(ConfigError, match="do not fit small-cnn"):
        load_model_dirs([tmp_path / "b"])


def test_metrics_of_degenerate_splits_are_reported_not_raised() -> None:
    import warnings

    import numpy as np

    from secure_oneshot.metrics import classification_metrics

    scores = np.array([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warning either
        one_class = classification_metrics(np.array([1, 1, 1]), scores)
        one_record = classification_metrics(np.array([1]), scores[:1])
    assert one_class["acc"] == pytest.approx(2 / 3) and np.isnan(one_class["auc"])
    assert one_record["acc"] == 1.0 and np.isnan(one_record["auc"])
    diverged = classification_metrics(np.array([0, 1]), np.array([[np.nan, np.nan], [0.5, 0.5]]))
    assert all(np.isnan(v) for v in diverged.values())


def test_withheld_bn_statistics_make_the_site_model_normalise_with_batch_statistics(tmp_path: Path) -> None:
    import copy

    from secure_oneshot.server.study import prior_options, bn_statistics_released

    (original,) = _sites(1)
    for m in original.model.modules():  # non-default statistics, so using them or not makes a difference
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    state = {k: v for k, v in classifier_state(original.model).items() if not k.endswith(("running_mean", "running_var"))}
    record = {"format": "secure-oneshot-model/v1", "site": "a", "dp": {},
              "artifacts": {"classifier": {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2, "norm": "batch"}}}
    write_model_dir(tmp_path / "a", {"classifier": state}, record)
    (site,) = load_model_dirs([tmp_path / "a"])

    assert bn_statistics_released(original.model) is True and bn_statistics_released(site.model) is False
    x = torch.randn(16, 1, 28, 28)
    batch_mode = copy.deepcopy(original.model).eval()
    for m in batch_mode.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
    with torch.no_grad():
        assert torch.allclose(site.model.eval()(x), batch_mode(x), atol=1e-5)
        assert not torch.allclose(site.model(x), original.model.eval()(x), atol=1e-3)
    student = build_classifier(site.config)
    assert prior_options([site], student)["student"] is student  # no BN prior left: the adversarial term, not CE alone
    assert "student" not in prior_options([original], student)

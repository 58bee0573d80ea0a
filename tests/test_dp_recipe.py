"""The DP recipe's pieces: augmentation multiplicity clips per record, costs no epsilon; the weight average."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secure_oneshot.client.dp_recipe import WeightAverage, augment_views, average_view_grad_samples
from secure_oneshot.client.train import PRESETS, TrainConfig, train_classifier, training_step
from secure_oneshot.data import MedMNISTSplit, SiteData
from secure_oneshot.errors import ConfigError
from secure_oneshot.models.classifier import ClassifierConfig
from secure_oneshot.policy.dp import compute_epsilon


def test_views_are_record_major_and_come_from_their_record() -> None:
    # constant images survive any translation (reflect padding) and flip unchanged: each view shows its record's value
    images = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 1, 8, 8).contiguous()
    views = augment_views(images, 3, torch.Generator().manual_seed(0))
    assert views.shape == (15, 1, 8, 8)
    assert torch.equal(views.amax(dim=(1, 2, 3)), torch.arange(5, dtype=torch.float32).repeat_interleave(3))
    assert torch.equal(views.amin(dim=(1, 2, 3)), torch.arange(5, dtype=torch.float32).repeat_interleave(3))


def test_views_differ_from_each_other_and_one_view_is_the_identity() -> None:
    images = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    assert augment_views(images, 1) is images
    views = augment_views(images, 8, torch.Generator().manual_seed(2))
    distinct = {tuple(np.round(v.numpy().ravel()[:20], 4)) for v in views[:8]}
    assert len(distinct) > 1
    assert augment_views(images[:0], 4).shape == (0, 1, 12, 12)


def _private(model: nn.Module, *, records: int, batch: int, clip: float, lr: float = 1.0):  # type: ignore[no-untyped-def]
    from opacus import PrivacyEngine

    data = TensorDataset(torch.zeros(records, 1, 6, 6), torch.zeros(records, dtype=torch.long))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=batch),
                               noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False)


def _per_view_gradients(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flat gradient of each view's own cross-entropy (rows: views)."""
    rows = []
    for xi, yi in zip(x, y):
        w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        loss = nn.functional.cross_entropy(xi.reshape(1, -1) @ w.T + b, yi[None])
        gw, gb = torch.autograd.grad(loss, (w, b))
        rows.append(torch.cat([gw.ravel(), gb.ravel()]))
    return torch.stack(rows)


def _clip(g: torch.Tensor, c: float) -> torch.Tensor:
    return g * torch.clamp(c / (g.norm(dim=1, keepdim=True) + 1e-6), max=1.0)


def test_a_record_contributes_one_clipped_gradient_whatever_the_number_of_views() -> None:
    torch.manual_seed(0)
    records, views, clip = 4, 3, 0.05
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    before = torch.cat([model[1].weight.detach().ravel(), model[1].bias.detach().ravel()]).clone()
    model, optimizer, _ = _private(model, records=records, batch=records, clip=clip)
    x, y = torch.randn(records, 1, 6, 6) * 3, torch.tensor([0, 1, 0, 1])
    generator_state = torch.Generator().manual_seed(7)
    expected_views = augment_views(x, views, torch.Generator().manual_seed(7))
    per_view = _per_view_gradients(model._module[1].weight, model._module[1].bias, expected_views, y.repeat_interleave(views))

    training_step(model, optimizer, nn.CrossEntropyLoss(), x, y, views, generator_state)
    after = torch.cat([model._module[1].weight.detach().ravel(), model._module[1].bias.detach().ravel()])
    update = before - after  # lr 1, no noise: the update is the mean clipped gradient

    per_record = per_view.reshape(records, views, -1).mean(dim=1)
    assert (per_record.norm(dim=1) > clip).all(), "the test needs every record's gradient to be clipped"
    right = _clip(per_record, clip).sum(0) / records
    clipped_views_averaged = _clip(per_view, clip).reshape(records, views, -1).mean(1).sum(0) / records
    clipped_views_summed = _clip(per_view, clip).sum(0) / records
    assert torch.allclose(update, right, atol=1e-6)
    assert not torch.allclose(update, clipped_views_averaged, atol=1e-4)
    assert not torch.allclose(update, clipped_views_summed, atol=1e-4)
    # sensitivity: one record moves the update by at most clip / batch
    assert float(_clip(per_record, clip)[0].norm()) <= clip + 1e-6


def test_averaging_views_handles_accumulated_physical_batches() -> None:
    p = nn.Parameter(torch.zeros(3))
    p.grad_sample = [torch.ones(2, 3), torch.arange(12, dtype=torch.float32).reshape(4, 3)]
    average_view_grad_samples([p], 2)
    assert torch.equal(p.grad_sample[0], torch.ones(2, 3))            # an earlier physical batch: already averaged
    assert torch.equal(p.grad_sample[1], torch.tensor([[1.5, 2.5, 3.5], [7.5, 8.5, 9.5]]))
    q = nn.Parameter(torch.zeros(1))
    q.grad_sample = torch.ones(5, 1)
    with pytest.raises(RuntimeError, match="views"):
        average_view_grad_samples([q], 2)


def _tiny_site(n: int = 96, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    images = (rng.normal(size=(n, 28, 28)) * 20 + 100 + labels[:, None, None] * 60).clip(0, 255).astype(np.uint8)
    split = MedMNISTSplit("pneumoniamnist", "train", images, labels, 2, 1, "binary-class")
    return SiteData(split, split.subset(np.arange(16)), split.subset(np.arange(16, 48)))


def test_dp_preset_accounting_is_the_logical_batch_and_steps_actually_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _tiny_site()
    base = replace(PRESETS["dp"], epochs=2, dp_epsilon=8.0, label_counts_epsilon=None, max_physical_batch_size=8, accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train_classifier(ClassifierConfig("small-cnn", 1, 2), replace(base, augment_views=1), data)
        many = train_classifier(ClassifierConfig("small-cnn", 1, 2), replace(base, augment_views=3), data)
    assert one.dp is not None and many.dp is not None
    logical_steps = math.ceil(len(data.train) / base.batch_size)
    [(sigma, rate, steps)] = many.dp.history
    assert rate == pytest.approx(1 / logical_steps)                   # Poisson rate of the logical batch
    assert steps == base.epochs * logical_steps == sum(row["steps"] for row in many.history)
    assert many.dp.history == one.dp.history                          # views cost nothing
    assert many.dp.epsilon == pytest.approx(compute_epsilon("rdp", many.dp.history, base.dp_delta))
    assert many.dp.epsilon <= 8.0


def test_ghost_clipping_cannot_average_views() -> None:
    cfg = replace(PRESETS["dp"], epochs=1, dp_epsilon=8.0, label_counts_epsilon=None, augment_views=2, grad_sample_mode="ghost")
    with pytest.raises(ConfigError, match="per-sample"):
        train_classifier(ClassifierConfig("small-cnn", 1, 2), cfg, _tiny_site())


def test_weight_average_warms_up_then_follows_the_decay() -> None:
    model = nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, 0.5)
    assert average.model(model) is model                              # never updated: the model itself
    for value in (1.0, 3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update(model)
    # first update copies (1); then decay min(0.5, 2/11) -> 1*2/11 + 3*9/11; then min(0.5, 3/12) = 0.25
    second = 1 * 2 / 11 + 3 * 9 / 11
    assert float(average.model(model).weight.detach()) == pytest.approx(0.25 * second + 0.75 * 5)
    assert WeightAverage(model, 0.0).model(model) is model
    with pytest.raises(ValueError):
        WeightAverage(model, 1.0)


def test_train_config_default_keeps_the_published_recipe() -> None:
    assert TrainConfig().augment_views == 1 and TrainConfig().ema_decay == 0.0


SITE = """
[data]
flag = "pneumoniamnist"
[train]
{train}
"""


def test_dp_picks_the_dp_preset_unless_the_config_names_one() -> None:
    from secure_oneshot.client.site_config import site_config_from_text, with_dp

    dp = site_config_from_text(SITE.format(train="dp_epsilon = 8.0\nepochs = 3"))
    assert dp.train == replace(PRESETS["dp"], dp_epsilon=8.0, epochs=3)
    plain = site_config_from_text(SITE.format(train="epochs = 3"))
    assert plain.train == replace(PRESETS["cpu"], epochs=3)
    named = site_config_from_text(SITE.format(train='preset = "cpu"\ndp_epsilon = 8.0'))
    assert named.train == replace(PRESETS["cpu"], dp_epsilon=8.0)
    # `train --dp-epsilon` on a config without DP: as if the config had said dp_epsilon itself
    assert with_dp(plain, 4.0, 1e-6).train == replace(PRESETS["dp"], epochs=3, dp_epsilon=4.0, dp_delta=1e-6)
    assert with_dp(named, 4.0, 1e-5).train == replace(PRESETS["cpu"], dp_epsilon=4.0)

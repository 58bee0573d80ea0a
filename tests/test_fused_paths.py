"""The server's fast paths compute what the plain code computes.

* ``batch_moments`` (``E[x^2] - E[x]^2``) equals ``mean`` + biased ``var`` -- values and gradients --
  for NCHW, channels_last, bf16 and 2-D inputs, and inside ``vmap`` (the batched ensemble's hooks).
* ``_replay`` (the eval-mode teacher over several snapshots per pass) gives the per-snapshot logits,
  and a distillation epoch with the train-mode noise-adapted teacher still normalises each snapshot
  by its own statistics: its loss and the student it leaves equal a one-snapshot-at-a-time reference.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from secure_oneshot.server import distill as distill_module
from secure_oneshot.server.snapshot_store import SnapshotStore
from secure_oneshot.server.distill import per_image_kd
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import PLAIN_LOOP
from secure_oneshot.server.bn_moments import _RawMoments
from secure_oneshot.server.bn_moments import batch_moments

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0, *range(2, x.dim())]
    x = x.float()
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def layer_input(shape: tuple[int, ...], memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    torch.manual_seed(0)
    channel_offsets = torch.linspace(-2, 2, shape[1]).reshape(1, -1, *[1] * (len(shape) - 2))
    x = torch.randn(shape) * 1.5 + channel_offsets   # means of a few std, as BatchNorm inputs have
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_moments_equal_mean_and_biased_var_with_gradients(memory_format):
    x = layer_input((16, 8, 7, 7), memory_format)
    weights = torch.randn(2, 8)
    grads = []
    for moments in (batch_moments, reference_moments):
        leaf = x.clone().requires_grad_(True)
        mean, var = moments(leaf)
        (weights[0] @ mean + weights[1] @ var).backward()
        grads.append(leaf.grad)
        if moments is batch_moments:
            fused = (mean.detach(), var.detach())
    expected = reference_moments(x)
    torch.testing.assert_close(fused[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[1], expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_fused_moments_are_biased_not_unbiased():
    x = layer_input((2, 3, 2, 2))   # 8 values per channel: n/(n-1) = 8/7 would show
    torch.testing.assert_close(batch_moments(x)[1], x.var(dim=[0, 2, 3], unbiased=False))
    assert not torch.allclose(batch_moments(x)[1], x.var(dim=[0, 2, 3], unbiased=True))


def test_fused_moments_of_bf16_and_2d_inputs_and_constant_channels():
    x = layer_input((16, 8, 5, 5)).bfloat16()
    for got, want in zip(batch_moments(x), reference_moments(x)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    flat = layer_input((32, 6))
    for got, want in zip(batch_moments(flat), reference_moments(flat)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    dead = torch.zeros(4, 3, 5, 5)   # a dead ReLU channel: variance exactly 0, never negative
    assert torch.equal(batch_moments(dead)[1], torch.zeros(3))


def test_fused_moments_inside_vmap_as_the_batched_ensemble_runs_them():
    stacked = torch.stack([layer_input((8, 4, 5, 5)) * (s + 1) for s in range(3)])
    means, variances = vmap(batch_moments)(stacked)
    for s in range(3):
        mean, var = reference_moments(stacked[s])
        torch.testing.assert_close(means[s], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(variances[s], var, rtol=1e-5, atol=1e-5)


def test_fused_moments_gradient_is_exact_in_float64():
    """The closed-form backward against numerical differentiation (float64: ``batch_moments`` itself casts to float32)."""
    for shape, dims in (((3, 2, 3, 3), (0, 2, 3)), ((5, 3), (0,)), ((4, 3, 2), (0, 2))):
        leaf = layer_input(shape).double().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: _RawMoments.apply(t, dims), (leaf,))
        partial = leaf.detach().clone().requires_grad_(True)   # only one moment used: the other's gradient is zeros
        _RawMoments.apply(partial, dims)[1].sum().backward()
        torch.testing.assert_close(partial.grad, 2 * partial.detach() / (partial.numel() // shape[1]))


def test_fused_moments_gradients_inside_vmap():
    stacked = torch.stack([layer_input((8, 4, 5, 5)) * (s + 1) for s in range(3)]).requires_grad_(True)
    weights = torch.randn(2, 4)
    means, variances = vmap(batch_moments)(stacked)
    (means @ weights[0] + variances @ weights[1]).sum().backward()
    leaf = stacked.detach().clone().requires_grad_(True)
    total = sum(weights[0] @ m + weights[1] @ v for m, v in (reference_moments(leaf[s]) for s in range(3)))
    total.backward()
    torch.testing.assert_close(stacked.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def bn_site(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def snapshots(count: int = 7, batch: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(batch, 1, 8, 8) * (1 + i), torch.tensor(i / count)) for i in range(count)]


def as_store(shots: list[tuple[torch.Tensor, torch.Tensor]]) -> SnapshotStore:
    """The snapshots as distillation holds them (in memory; ``a`` per image)."""
    store = SnapshotStore("cpu", budget_bytes=None)
    for x, a in shots:
        store.append(x, a.expand(x.shape[0]))
    return store


def test_replay_gives_the_per_snapshot_logits_of_the_eval_teacher(monkeypatch):
    monkeypatch.setitem(distill_module.REPLAY_IMAGES, "cpu", 20)   # 3 snapshots of 6 per pass, then the rest
    teacher = Ensemble([bn_site(0), bn_site(1)])
    shots = snapshots()
    replayed = distill_module._replay(teacher, as_store(shots), PLAIN_LOOP)
    assert len(replayed) == len(shots)
    with torch.no_grad():
        for got, (x, _) in zip(replayed, shots):
            torch.testing.assert_close(got, teacher(x), rtol=1e-5, atol=1e-5)


def reference_epoch(student, teacher, adapted, shots, optimizer, T):
    """One snapshot at a time, both teachers run per snapshot."""
    student.train()
    losses = []
    for x, a in shots:
        with torch.no_grad():
            t = teacher(x).float()
            n = adapted(x).float()
        s = student(x).float()
        loss = (a * per_image_kd(s, t, T) + (1 - a) * per_image_kd(s, n, T)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("adapted_mode", ["train-mode", "eval"])
def test_distill_epoch_with_batched_replay_equals_the_per_snapshot_loop(monkeypatch, adapted_mode):
    monkeypatch.setitem(distill_module.REPLAY_IMAGES, "cpu", 20)
    sites = [bn_site(0), bn_site(1)]
    shots = snapshots()
    runs = []
    for epoch in (distill_module._distill_epoch, None):
        teacher = Ensemble(sites)
        adapted = Ensemble(sites, adapt_bn=True)
        if adapted_mode == "eval":
            distill_module._refresh_running_stats(adapted, shots, PLAIN_LOOP)
        student = bn_site(5)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        if epoch is None:
            loss = reference_epoch(student, teacher, adapted, shots, optimizer, 4.0)
        else:
            loss = epoch(student, teacher, adapted, as_store(shots), optimizer, 4.0, PLAIN_LOOP)
        runs.append((loss, student.state_dict()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    for name, value in runs[0][1].items():
        torch.testing.assert_close(value, runs[1][1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("adapted_mode", ["train-mode", "eval"])
def test_realistic_batches_skip_the_adapted_teacher_with_the_same_result(monkeypatch, adapted_mode):
    """Batches stored ``teacher_only`` (a = 1 everywhere: proxy and generator images) never run the noise-adapted
    teacher, and the epoch's loss and student equal, bit for bit, those of running it with weight 0."""
    sites = [bn_site(0), bn_site(1)]
    shots = [(x, torch.tensor(1.0)) for x, _ in snapshots()]
    runs, calls = [], []
    for skip in (True, False):
        teacher = Ensemble(sites)
        adapted = Ensemble(sites, adapt_bn=True)
        if adapted_mode == "eval":
            distill_module._refresh_running_stats(adapted, shots, PLAIN_LOOP)
        adapted.register_forward_hook(lambda *_: calls.append(skip))
        store = SnapshotStore("cpu", budget_bytes=None)
        for x, a in shots:
            store.append(x, a.expand(x.shape[0]), teacher_only=skip)
        student = bn_site(5)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        loss = distill_module._distill_epoch(student, teacher, adapted, store, optimizer, 4.0, PLAIN_LOOP)
        runs.append((loss, student.state_dict()))
    assert calls.count(True) == 0 and calls.count(False) > 0
    assert torch.equal(runs[0][0], runs[1][0])
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def test_a_batched_train_mode_adapted_teacher_would_change_the_targets():
    """The reason it is not batched: train-mode BatchNorm normalises by the whole pass's statistics."""
    adapted = Ensemble([bn_site(0)], adapt_bn=True)
    shots = snapshots(3)
    with torch.no_grad():
        alone = adapted(shots[0][0])
        together = adapted(torch.cat([x for x, _ in shots]))[: shots[0][0].shape[0]]
    assert (alone - together).abs().max() > 1e-2
    assert F.mse_loss(alone, together) > 0

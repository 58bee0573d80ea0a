"""The server's CUDA paths: skipped without a GPU (CI has none); run by ``benchmarks/gpu_check.sh`` on one.

On CUDA the server takes paths the CPU suite never runs: the ``vmap``-batched ensemble (``batched`` is
``auto``: on for CUDA), bf16 autocast where the calibration picks it, and the replay's larger passes.
These tests check that those paths compute what the plain float32 loop computes, to the precision
each one has.

``SECURE_ONESHOT_TEST_DEVICE=cpu`` runs the same tests on the CPU (to check the tests themselves).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.server import synthesis
from secure_oneshot.server.distill import DistillConfig, distill
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.synthesis import InversionConfig

DEVICE = os.environ.get("SECURE_ONESHOT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")


def sites(count: int = 3, classes: int = 2) -> list[nn.Module]:
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_classifier(ClassifierConfig("small-cnn", 1, classes))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        models.append(model.eval())
    return models


def test_statistics_loss_and_gradient_of_the_batched_ensemble_match_the_loop():
    """The statistics hooks inside ``vmap`` (the batched ensemble, with the one-pass moment gradient) against
    the loop, float32: logits, loss and the input's gradient."""
    x = torch.randn(16, 1, 28, 28, device=DEVICE)
    results = []
    for batched in (True, False):
        ensemble = Ensemble(sites(), batched=batched).to(DEVICE)
        leaf = x.clone().requires_grad_(True)
        with synthesis.BNStatHooks(ensemble) as hooks:
            logits, loss = hooks.per_site(leaf)
            (logits.float().sum() + loss).backward()
        results.append((logits.detach().float(), loss.detach(), leaf.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_a_short_distillation_with_the_automatic_settings_runs_and_stays_finite():
    """``Execution()``'s automatic choices on this device (calibrated precision and layout, batching) end finite."""
    torch.manual_seed(0)
    student = build_classifier(ClassifierConfig("small-cnn", 1, 2))
    synth = InversionConfig(batch_size=32, steps=8, image_size=28, jitter=2)
    result = distill(student, sites(), synth, DistillConfig(epochs=2), execution=Execution(device=DEVICE))
    losses = [record["loss"] for record in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert next(student.parameters()).device.type == torch.device(DEVICE).type


def test_the_batched_ensemble_gives_the_loops_teacher_logits_and_bf16_stays_close():
    """The vmap-batched ensemble gives the loop's float32 teacher logits; under bf16 autocast, within its precision."""
    x = torch.randn(64, 1, 28, 28, device=DEVICE)
    loop = Ensemble(sites(), batched=False).to(DEVICE)
    batched = Ensemble(sites(), batched=True).to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(batched(x), loop(x), rtol=1e-4, atol=1e-4)
        if DEVICE.startswith("cuda") and torch.cuda.is_bf16_supported():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = batched(x).float()
            assert (low - loop(x)).abs().max() < 0.1 * loop(x).abs().max() + 0.05

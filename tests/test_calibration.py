"""Measured choice of precision and layout: argmin of the timings, cached per device, reported.

Timings are injected (no wall-clock assertions): a fake timer returns fixed seconds per candidate
and counts its calls, so the tests see exactly when the cache spared a measurement.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from secure_oneshot.server import calibration
from secure_oneshot.server.calibration import CACHE_FILE, calibrate, candidates
from secure_oneshot.server.execution import Execution

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BATCH = (8, 1, 8, 8)


def site(seed: int, norm: str = "batch") -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer, nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


class FakeTimer:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls: list[str] = []

    def __call__(self, execution: Execution) -> float:
        name = f"{execution.precision} {'channels_last' if execution.channels_last else 'NCHW'}"
        self.calls.append(name)
        return self.seconds[name]


TIMINGS = {"fp32 NCHW": 0.548, "bf16 NCHW": 4.286, "fp32 channels_last": 0.638, "bf16 channels_last": 4.561}


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(calibration, "_cpu_has_any_bf16", lambda: True)


def test_candidates_follow_the_overrides(bf16_cpu):
    names = lambda ex: {(c.precision, c.channels_last) for c in candidates(ex)}  # noqa: E731
    assert names(Execution("cpu")) == {("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)}
    assert names(Execution("cpu", channels_last=False)) == {("fp32", False), ("bf16", False)}   # --no-channels-last
    assert names(Execution("cpu", precision="fp32")) == {("fp32", False), ("fp32", True)}


@pytest.mark.parametrize("fastest", sorted(TIMINGS))
def test_calibration_picks_the_argmin_of_the_timings(tmp_path, bf16_cpu, fastest):
    timings = {name: (0.1 if name == fastest else seconds + 1) for name, seconds in TIMINGS.items()}
    chosen = calibrate(Execution("cpu"), [site(0), site(1)], site(2), BATCH, timer=FakeTimer(timings), device="Test CPU",
                       cache=tmp_path / CACHE_FILE)
    precision, layout = fastest.split()
    assert (chosen.precision, chosen.channels_last) == (precision, layout == "channels_last")
    assert chosen.use_bf16 == (precision == "bf16")
    assert chosen.calibration["choice"] == fastest and chosen.calibration["cached"] is False
    assert chosen.calibration["timings_ms"][fastest] == pytest.approx(100.0)
    described = chosen.describe()
    assert described["precision"] == precision and described["calibration"]["choice"] == fastest


def test_the_measured_choice_beats_the_group_norm_rule(tmp_path, bf16_cpu):
    timings = {name: (0.1 if name == "fp32 channels_last" else 1.0) for name in TIMINGS}
    models = [site(0, "group"), site(1, "group")]
    chosen = calibrate(Execution("cpu"), models, None, BATCH, timer=FakeTimer(timings), device="Test CPU", cache=tmp_path / CACHE_FILE)
    assert chosen.for_models(models).channels_last is True
    assert Execution("cpu").for_models(models).channels_last is False   # uncalibrated: the old rule


def test_the_cache_round_trips_and_is_keyed_per_device_and_batch(tmp_path, bf16_cpu):
    cache = tmp_path / "deep" / CACHE_FILE
    models = [site(0), site(1)]
    first = FakeTimer(TIMINGS)
    chosen = calibrate(Execution("cpu"), models, None, BATCH, timer=first, device="CPU A", cache=cache)
    assert chosen.calibration["choice"] == "fp32 NCHW" and first.calls
    assert len(json.loads(cache.read_text())) == 1

    again = FakeTimer({name: 0.0 for name in TIMINGS})   # would pick something else if it were asked
    cached = calibrate(Execution("cpu"), models, None, BATCH, timer=again, device="CPU A", cache=cache)
    assert again.calls == []
    assert cached.calibration == {**chosen.calibration, "cached": True}
    assert (cached.precision, cached.channels_last) == (chosen.precision, chosen.channels_last)

    other_device = FakeTimer({name: (0.1 if name == "bf16 channels_last" else 1.0) for name in TIMINGS})
    assert calibrate(Execution("cpu"), models, None, BATCH, timer=other_device, device="CPU B", cache=cache).calibration["choice"] == "bf16 channels_last"
    assert other_device.calls

    other_batch = FakeTimer(TIMINGS)
    calibrate(Execution("cpu"), models, None, (16, 1, 8, 8), timer=other_batch, device="CPU A", cache=cache)
    assert other_batch.calls
    assert len(json.loads(cache.read_text())) == 3


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]", b'{"k": 1}', b"\xff\xfe"])
def test_a_corrupt_cache_is_ignored_and_rewritten(tmp_path, bf16_cpu, garbage):
    cache = tmp_path / CACHE_FILE
    cache.write_bytes(garbage)
    timer = FakeTimer(TIMINGS)
    chosen = calibrate(Execution("cpu"), [site(0)], None, BATCH, timer=timer, device="CPU A", cache=cache)
    assert timer.calls and chosen.calibration["choice"] == "fp32 NCHW"
    stored = json.loads(cache.read_text())
    assert [entry["choice"] for entry in stored.values() if isinstance(entry, dict)] == ["fp32 NCHW"]


def test_a_cached_entry_naming_an_unknown_choice_is_measured_again(tmp_path, bf16_cpu):
    cache = tmp_path / CACHE_FILE
    calibrate(Execution("cpu"), [site(0)], None, BATCH, timer=FakeTimer(TIMINGS), device="CPU A", cache=cache)
    stored = json.loads(cache.read_text())
    for entry in stored.values():
        entry["choice"] = "fp64 sideways"
    cache.write_text(json.dumps(stored))
    timer = FakeTimer(TIMINGS)
    assert calibrate(Execution("cpu"), [site(0)], None, BATCH, timer=timer, device="CPU A", cache=cache).calibration["cached"] is False
    assert timer.calls


def test_nothing_open_means_no_measurement(tmp_path):
    fixed = Execution("cpu", precision="fp32", channels_last=False)
    timer = FakeTimer(TIMINGS)
    assert calibrate(fixed, [site(0)], None, BATCH, timer=timer, cache=tmp_path / CACHE_FILE) is fixed
    assert timer.calls == [] and not (tmp_path / CACHE_FILE).exists()


def test_the_real_timer_runs_each_candidate_and_fp32_layouts_agree(tmp_path, bf16_cpu, monkeypatch):
    monkeypatch.setitem(calibration.BUDGET_S, "cpu", 0.5)
    models, student = [site(0), site(1)], site(2)
    chosen = calibrate(Execution("cpu"), models, student, BATCH, device="CPU real", cache=tmp_path / CACHE_FILE)
    assert set(chosen.calibration["timings_ms"]) == set(TIMINGS)
    assert all(v > 0 for v in chosen.calibration["timings_ms"].values())
    # The layouts compute the same function: float32 NCHW and channels_last agree to float reordering.
    x = torch.randn(BATCH)
    outs = []
    for channels_last in (False, True):
        ex = Execution("cpu", precision="fp32", channels_last=channels_last)
        model = ex.prepare(site(0))
        outs.append(model(ex.layout(x)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SECURE_ONESHOT_CACHE", str(tmp_path / "c"))
    assert calibration.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SECURE_ONESHOT_CACHE")
    assert calibration.cache_dir().name == "secure-oneshot"


def test_a_far_slower_option_is_not_repeated():
    timer = FakeTimer(TIMINGS)
    options = [Execution("cpu", precision=p, channels_last=cl) for p in ("fp32", "bf16") for cl in (False, True)]
    timings = calibration.measure(options, timer, budget_s=1e6, repeats=3)
    assert min(timings, key=timings.__getitem__) == "fp32 NCHW"
    assert timer.calls.count("fp32 NCHW") == 4 and timer.calls.count("fp32 channels_last") == 4
    assert timer.calls.count("bf16 NCHW") == 1 and timer.calls.count("bf16 channels_last") == 1


def test_a_probe_screens_out_an_option_without_running_it_at_full_size():
    full, small = FakeTimer(TIMINGS), FakeTimer({name: seconds / 8 for name, seconds in TIMINGS.items()})
    options = [Execution("cpu", precision=p, channels_last=cl) for p in ("fp32", "bf16") for cl in (False, True)]
    timings = calibration.measure(options, full, budget_s=1e6, repeats=2, probe=small, probe_scale=8.0)
    assert full.calls.count("bf16 NCHW") == 0 and full.calls.count("bf16 channels_last") == 0
    assert timings["bf16 NCHW"] == pytest.approx(TIMINGS["bf16 NCHW"])
    assert full.calls.count("fp32 channels_last") == 3   # close to the best: measured at full size
    assert min(timings, key=timings.__getitem__) == "fp32 NCHW"


def test_a_distillation_measures_unless_switched_off_and_reports_the_choice(tmp_path, monkeypatch):
    from secure_oneshot.models.classifier import ClassifierConfig
    from secure_oneshot.server.calibration import CALIBRATE_ENV
    from secure_oneshot.server.study import DistillJob, SiteModel, run_distillation

    cfg = ClassifierConfig("small-cnn", 1, 2, "batch")
    sites = [SiteModel(f"hospital-{i}", site(i), cfg) for i in range(2)]
    monkeypatch.setattr(calibration, "measure", lambda options, timer, budget, **_: {
        calibration._name(o): (0.1 if not o.channels_last else 0.2) for o in options})
    monkeypatch.delenv(CALIBRATE_ENV, raising=False)
    measured = run_distillation(sites, tmp_path / "on", DistillJob(preset="smoke", execution=Execution(precision="fp32")))
    assert measured.report["execution"]["calibration"]["choice"] == "fp32 NCHW"
    assert measured.report["execution"]["channels_last"] is False
    monkeypatch.setenv(CALIBRATE_ENV, "off")
    fixed = run_distillation(sites, tmp_path / "off", DistillJob(preset="smoke", execution=Execution(precision="fp32")))
    assert fixed.report["execution"].get("calibration") is None and fixed.report["execution"]["channels_last"] is True

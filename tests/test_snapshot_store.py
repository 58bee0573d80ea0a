"""The epoch's snapshot store: spilling to a private file changes nothing but where the images wait.

* the file round trip is exact (values, dtype, strides) and the file is private (0600 in a 0700 directory);
* a distillation whose snapshots all go to the file (budget 0) ends with the same global model, bit for bit,
  as the in-memory default, through every consumer: teacher replay, the eval-mode noise-adapted teacher's
  refresh and replay, the train-mode adapted teacher, the student steps, BN recalibration, the last images;
* nothing is left on disk after an epoch, after an error, or after a KeyboardInterrupt;
* a bad budget is a ConfigError.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import secure_oneshot.server.distill as distill_module
import secure_oneshot.server.snapshot_store as store_module
from secure_oneshot.errors import ConfigError
from secure_oneshot.server.distill import DistillConfig, TrainingState, distill
from secure_oneshot.server.ensemble import Ensemble
from secure_oneshot.server.execution import PLAIN_LOOP
from secure_oneshot.server.snapshot_store import SnapshotStore
from secure_oneshot.server.sources import SnapshotSource, SynthesisMethod
from secure_oneshot.server.synthesis import InversionConfig

SIZE = 8


def tiny(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def synth(**kwargs) -> InversionConfig:
    return InversionConfig(**{"batch_size": 8, "steps": 6, "image_size": SIZE, "jitter": 1, "num_classes": 2, **kwargs})


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every temporary directory of the run goes here, so what is left behind can be listed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def spill_dirs(tmp: Path) -> list[Path]:
    """The snapshot stores' directories under ``tmp`` (other libraries keep their own caches there too)."""
    return sorted(tmp.glob("secure-oneshot-snapshots-*"))


def test_spilled_snapshots_read_back_bit_for_bit_with_their_strides(private_tmp: Path) -> None:
    torch.manual_seed(0)
    shots = [torch.randn(3, 1, 8, 8),
             torch.randn(3, 3, 8, 8).contiguous(memory_format=torch.channels_last),
             torch.randn(5, 3, 8, 8).contiguous(memory_format=torch.channels_last),
             torch.randn(2, 3, 8, 8, dtype=torch.float64),
             torch.randn(4, 3, 8, 8).transpose(2, 3)]   # a dense, permuted layout
    store = SnapshotStore("cpu", budget_bytes=1000)     # the first snapshot (768 bytes) fits, the second does not
    for i, x in enumerate(shots):
        store.append(x, torch.full((len(x),), i / 5))
    assert store.spilled and store.sizes == [3, 3, 5, 2, 4]
    [directory] = spill_dirs(private_tmp)
    [file] = list(directory.iterdir())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and stat.S_IMODE(file.stat().st_mode) == 0o600
    assert file.stat().st_size == sum(x.numel() * x.element_size() for x in shots)
    for i, (x, (got, a)) in enumerate(zip(shots, store)):
        assert torch.equal(got, x) and got.dtype == x.dtype and got.stride() == x.stride(), i
        assert torch.equal(a, torch.full((len(x),), i / 5))
    pair = store.images(1, 3)
    assert torch.equal(pair, torch.cat(shots[1:3])) and pair.stride() == torch.cat(shots[1:3]).stride()
    assert [float(a[0]) for _, a in store[-2:]] == pytest.approx([3 / 5, 4 / 5])
    store.close()
    store.close()   # idempotent
    assert spill_dirs(private_tmp) == []


def test_within_the_budget_nothing_is_copied_or_written(private_tmp: Path) -> None:
    x = torch.randn(4, 1, 8, 8)
    with SnapshotStore("cpu") as store:
        store.append(x, torch.zeros(4))
        assert not store.spilled and store[0][0] is x   # the very tensor, as a plain list kept it
    assert spill_dirs(private_tmp) == []


def test_the_file_is_removed_when_the_epoch_is_interrupted(private_tmp: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with SnapshotStore("cpu", budget_bytes=0) as store:
            store.append(torch.randn(2, 1, 8, 8), torch.zeros(2))
            assert store.spilled and len(spill_dirs(private_tmp)) == 1
            raise KeyboardInterrupt
    assert spill_dirs(private_tmp) == []


def run(memory_mib: float, noise_adapted: str, method: SynthesisMethod | None = None, proxy: torch.Tensor | None = None,
        seen: list[torch.Tensor] | None = None) -> nn.Module:
    sites = [tiny(1), tiny(2)]
    torch.manual_seed(7)
    student = tiny(9).train()
    cfg = DistillConfig(epochs=2, lr=0.05, temperature=4.0, noise_adapted=noise_adapted, recalibrate_bn=0.5, seed=3)

    def keep_last(state: TrainingState) -> None:
        if seen is not None:
            seen.append(state.last_images.clone())

    distill(student, sites, synth(snapshot_every=1), cfg, execution=PLAIN_LOOP, method=method, proxy_images=proxy,
            snapshot_memory_mib=memory_mib, on_epoch_end=keep_last)
    return student


@pytest.mark.parametrize("noise_adapted", ["eval", "train-mode"])
def test_a_spilled_distillation_equals_the_in_memory_one_bit_for_bit(private_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     noise_adapted: str) -> None:
    monkeypatch.setitem(distill_module.REPLAY_IMAGES, "cpu", 20)   # replay chunks of two snapshots: store.images(i, i + 2)
    opened: list[SnapshotStore] = []
    original = store_module.SnapshotStore._open
    monkeypatch.setattr(store_module.SnapshotStore, "_open", lambda self: (opened.append(self), original(self))[1])
    memory_last: list[torch.Tensor] = []
    in_memory = run(store_module.DEFAULT_SNAPSHOT_MEMORY_MIB, noise_adapted, seen=memory_last)
    assert opened == []
    spilled_last: list[torch.Tensor] = []
    spilled = run(0, noise_adapted, seen=spilled_last)
    assert len(opened) == 2   # one file per epoch
    for name, value in in_memory.state_dict().items():
        assert torch.equal(value, spilled.state_dict()[name]), name
    assert all(torch.equal(a, b) for a, b in zip(memory_last, spilled_last)) and len(spilled_last) == 2
    assert spill_dirs(private_tmp) == []   # every epoch's file removed


def test_a_spilled_inversion_plus_proxy_run_equals_the_in_memory_one(private_tmp: Path) -> None:
    proxy = torch.linspace(-1, 1, 20).view(20, 1, 1, 1).expand(20, 1, SIZE, SIZE).contiguous()
    method = SynthesisMethod("inversion+proxy", proxy_share=0.25)
    in_memory, spilled = run(store_module.DEFAULT_SNAPSHOT_MEMORY_MIB, "eval", method, proxy), run(0, "eval", method, proxy)
    for name, value in in_memory.state_dict().items():
        assert torch.equal(value, spilled.state_dict()[name]), name
    assert spill_dirs(private_tmp) == []


def test_a_failing_epoch_leaves_no_file(private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        assert len(spill_dirs(private_tmp)) == 1   # the epoch's snapshots are in their file now
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "_distill_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(0, "train-mode")
    assert spill_dirs(private_tmp) == []


def test_a_failing_inversion_leaves_no_file(private_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_oneshot.server.sources as sources_module

    real = sources_module.synthesize_batch

    def fails_after_two_snapshots(*args, on_snapshot, **kwargs):
        calls = []

        def keep(step, x):
            on_snapshot(step, x)
            calls.append(step)
            if len(calls) == 2:
                raise RuntimeError("device lost")

        return real(*args, on_snapshot=keep, **kwargs)

    monkeypatch.setattr(sources_module, "synthesize_batch", fails_after_two_snapshots)
    sites = [tiny(1)]
    source = SnapshotSource(sites, Ensemble(sites), synth(), SynthesisMethod(), PLAIN_LOOP, snapshot_memory_mib=0)
    with pytest.raises(RuntimeError, match="device lost"):
        source.epoch(0)
    assert spill_dirs(private_tmp) == []


@pytest.mark.parametrize("budget", [-1, "lots", True, float("nan"), float("inf")])
def test_a_bad_budget_is_a_config_error(budget) -> None:
    sites = [tiny(1)]
    with pytest.raises(ConfigError, match="snapshot_memory_mib must be a number >= 0"):
        SnapshotSource(sites, Ensemble(sites), synth(), SynthesisMethod(), PLAIN_LOOP, snapshot_memory_mib=budget)


def test_reading_a_truncated_file_is_an_error_not_garbage(private_tmp: Path) -> None:
    store = SnapshotStore("cpu", budget_bytes=0)
    store.append(torch.randn(2, 1, 8, 8), torch.zeros(2))
    assert store._fd is not None
    os.ftruncate(store._fd, 100)
    with pytest.raises(OSError, match="ended early"):
        store[0]
    store.close()
    assert spill_dirs(private_tmp) == []


@pytest.mark.parametrize("budget", ["-1", "inf", "nan"])
def test_the_distill_option_refuses_a_bad_budget_in_one_line(budget: str, tmp_path: Path, capsys) -> None:
    from secure_oneshot.cli import main
    from tests.model_helpers import make_real_model_dir

    model = make_real_model_dir(tmp_path / "site-a")
    code = main(["distill", "--model", str(model), "--preset", "smoke", "--snapshot-memory-mib", budget,
                 "--out", str(tmp_path / "global"), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 3 and "snapshot memory budget" in err and "Traceback" not in err
    assert not (tmp_path / "global" / "global.safetensors").exists()

"""Checkpoints and ``distill --resume``: a run cut short and resumed ends with the uninterrupted run's global model,
bit for bit; a checkpoint cut short is ignored; another job's checkpoint is refused; nothing in it is a pickle."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .model_helpers import make_real_model_dir
from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError
from secure_oneshot.server.checkpoint import CHECKPOINT_DIR, load_latest
from secure_oneshot.server.execution import Execution
from secure_oneshot.server.study import DistillJob, load_model_dirs, run_distillation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The state that carries over between epochs is exercised: the "eval" noise-adapted teacher's running statistics,
# the smoke preset's BN recalibration of the student, and SGD momentum.
EPOCHS = 3
JOB = DistillJob(preset="smoke", epochs=EPOCHS, execution=Execution(device="cpu"), noise_adapted="eval")
CLI_OPTIONS = ["--preset", "smoke", "--epochs", str(EPOCHS), "--device", "cpu", "--noise-adapted", "eval", "--threads", "1"]


class Crash(Exception):
    """Stands in for a process killed after an epoch's checkpoint."""


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    dirs = [make_real_model_dir(root / name, site=name) for name in ("site-a", "site-b")]
    # a second site with other weights: two different teachers
    state = load_file(dirs[1] / "classifier.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
              dirs[1] / "classifier.safetensors")
    return dirs


@pytest.fixture(scope="module")
def straight(site_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    run_distillation(load_model_dirs(site_dirs), out, JOB)
    return out


@pytest.fixture(scope="module")
def crashed(site_dirs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped right after epoch 2's checkpoint."""
    out = tmp_path_factory.mktemp("crashed")
    torch.set_num_threads(1)

    def crash(record: dict[str, float]) -> None:
        if record["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        run_distillation(load_model_dirs(site_dirs), out, JOB, on_epoch=crash)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "global.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_a_run_cut_short_writes_no_global_model_and_keeps_its_checkpoints(crashed: Path) -> None:
    assert not (crashed / "global.safetensors").exists() and not (crashed / "report.json").exists()
    assert sorted(p.name for p in (crashed / CHECKPOINT_DIR).iterdir()) == ["epoch-000001", "epoch-000002"]
    latest = load_latest(crashed)
    assert latest is not None and latest.epochs_done == 2 and [h["epoch"] for h in latest.meta["history"]] == [1, 2]


def test_checkpoint_files_are_safetensors_and_json_never_pickle(crashed: Path) -> None:
    for folder in (crashed / CHECKPOINT_DIR).iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["complete.json", "state.json", "state.safetensors"]
        for file in folder.iterdir():
            data = file.read_bytes()
            assert not data.startswith(b"\x80"), f"{file} looks like a pickle"
            assert b"torch._utils" not in data and b"cpickle" not in data.lower()
            if file.suffix == ".json":
                json.loads(data)
            else:
                header = int.from_bytes(data[:8], "little")
                assert json.loads(data[8:8 + header])["__metadata__"]["format"] == "secure-oneshot-checkpoint/v1"
                tensors = load_file(file)
                assert tensors["rng/cpu"].dtype == torch.uint8
                assert any(k.startswith("optimizer/") for k in tensors) and any(k.startswith("adapted/") for k in tensors)


def test_fingerprint_mismatch_is_refused(site_dirs: list[Path], crashed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in crashed.rglob("*"))
    models = [a for d in site_dirs for a in ("--model", str(d))]
    code = main(["distill", *models, *CLI_OPTIONS, "--seed", "1", "--resume", str(crashed)])
    err = capsys.readouterr().err
    assert code == 3
    assert "is of another job" in err and "inversion.seed (1 here, 0 in the checkpoint)" in err and "hint:" in err
    assert "Traceback" not in err
    # other site models: the weights' digest differs
    code = main(["distill", "--model", str(site_dirs[0]), "--model", str(site_dirs[0]), *CLI_OPTIONS, "--resume", str(crashed)])
    err = capsys.readouterr().err
    assert code == 3 and "sites.1:site-a" in err
    # a fresh run into an unfinished run's folder would throw its checkpoints away
    code = main(["distill", *models, *CLI_OPTIONS, "--out", str(crashed)])
    err = capsys.readouterr().err
    assert code == 3 and "unfinished run (2 epochs done)" in err and "--resume" in err
    assert sorted(p.name for p in crashed.rglob("*")) == before   # nothing written, nothing removed


def test_a_checkpoint_cut_short_is_ignored(crashed: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    root = run / CHECKPOINT_DIR
    newest = root / "epoch-000003"
    shutil.copytree(root / "epoch-000002", newest)
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])     # truncated, marker still there
    assert load_latest(run).epochs_done == 2
    shutil.copytree(root / "epoch-000002", root / "epoch-000004")
    (root / "epoch-000004" / "complete.json").unlink()                     # the marker never written
    assert load_latest(run).epochs_done == 2
    (root / "epoch-000002" / "state.json").write_text("{}")                # changed after the marker: not trusted
    assert load_latest(run).epochs_done == 1


def test_resume_gives_the_uninterrupted_global_model_bit_for_bit(site_dirs: list[Path], straight: Path, crashed: Path,
                                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    torch.manual_seed(12345)   # another process's generator state: the checkpoint must bring its own
    torch.rand(1000)
    # The fixtures ran on one thread; so must the resume (an earlier test may have left two): CPU kernels sum in
    # another order on two threads, and the conv biases in front of BatchNorm, whose gradients are rounding
    # noise, then differ (measured: features.1.bias at 1e-5).  Bit for bit holds for the same thread count.
    torch.set_num_threads(1)
    run_distillation(load_model_dirs(site_dirs), run, JOB, resume=True)
    _assert_identical(_state(straight), _state(run))
    straight_report, resumed_report = (json.loads((p / "report.json").read_text()) for p in (straight, run))
    assert resumed_report["global_sha256"] == straight_report["global_sha256"]
    assert [h["loss"] for h in resumed_report["history"]] == [h["loss"] for h in straight_report["history"]]
    assert resumed_report["distributed"] == straight_report["distributed"]   # the same images, epoch by epoch
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == ["epoch-000002", "epoch-000003"]   # the two newest


def test_a_finished_runs_folder_can_be_run_again(site_dirs: list[Path], straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / CHECKPOINT_DIR / ".epoch-000009.999999999.0123abcd.tmp").mkdir()   # a dead writer's leftover
    with pytest.raises(ConfigError, match="another job"):
        run_distillation(load_model_dirs(site_dirs), run, DistillJob(preset="smoke", epochs=1, execution=Execution(device="cpu")),
                         resume=True)
    run_distillation(load_model_dirs(site_dirs), run, DistillJob(preset="smoke", epochs=1, execution=Execution(device="cpu")))
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == ["epoch-000001"]   # the old run's cleared


@pytest.mark.slow
def test_killed_mid_run_then_resumed_matches_the_uninterrupted_run(site_dirs: list[Path], straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "secure_oneshot", "distill", *[a for d in site_dirs for a in ("--model", str(d))],
               *CLI_OPTIONS, "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / CHECKPOINT_DIR / "epoch-000001" / "complete.json").exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "global.safetensors").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_identical(_state(straight), _state(out))


def test_the_global_model_file_is_written_in_one_byte_order(straight: Path) -> None:
    """The same model must have one SHA-256 (it is in the report and the audit log): tensors by name, metadata keys
    in a fixed order (safetensors' own writer orders the metadata by a per-call hash: two byte strings measured)."""
    from secure_oneshot.bundle.safetensors_strict import serialize_tensors

    data = (straight / "global.safetensors").read_bytes()
    state = _state(straight)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    expected = b"".join(serialize_tensors(state, metadata=header["__metadata__"]))
    assert data == expected and list(header["__metadata__"]) == ["architecture", "format"]
    assert [k for k in header if k != "__metadata__"] == sorted(state)

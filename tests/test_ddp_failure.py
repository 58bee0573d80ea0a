"""A rank of a live two-rank ``distill`` job killed with SIGKILL: the whole job stops with one error line, leaves its
checkpoints and no global model, and ``--resume`` on two ranks ends with the uninterrupted run's model, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secure_oneshot.errors import ConfigError
from secure_oneshot.server.checkpoint import CHECKPOINT_DIR, load_latest
from secure_oneshot.server.distributed import DDP_TIMEOUT_ENV, Distributed, RankLostError, collective_timeout

from .model_helpers import make_real_model_dir

TIMEOUT_S = 300
STOP_WITHIN_S = 90          # the job must end this soon after the kill (torchrun's monitor, gloo's timeout below)
EPOCHS = 5                  # smoke epochs of a few seconds each: the kill lands while the job still runs
ENV = {**os.environ, "SECURE_ONESHOT_CALIBRATE": "off", "OMP_NUM_THREADS": "1", DDP_TIMEOUT_ENV: "30"}


@pytest.fixture(scope="module")
def site_options(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("sites")
    models = [a for name in ("site-a", "site-b") for a in ("--model", str(make_real_model_dir(root / name, site=name)))]
    return [*models, "--preset", "smoke", "--epochs", str(EPOCHS), "--device", "cpu", "--threads", "1"]


def _torchrun_command(args: list[str], log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--log-dir", str(log_dir),
            "--redirects", "3", "-m", "secure_oneshot", "distill", *args]


def _run_to_end(command: list[str]) -> subprocess.CompletedProcess[str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        _kill_group(process)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _kill_group(process: subprocess.Popen[str]) -> None:
    """Nothing of the job outlives the test: its whole process group (torchrun and its ranks)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:    # field 4, ppid, after the command name in parentheses
                children.append(int(entry.name))
    return children


def _rank_pid(agent: int, rank: int) -> int | None:
    """The worker process torchrun's agent started for ``rank`` (its environment says ``RANK``)."""
    for pid in _children(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _rank_log(log_dir: Path, rank: int, stream: str) -> str:
    [log] = log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
    return log.read_text()


def test_the_collective_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DDP_TIMEOUT_ENV, raising=False)
    assert collective_timeout() is None
    monkeypatch.setenv(DDP_TIMEOUT_ENV, "2.5")
    assert collective_timeout().total_seconds() == 2.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(DDP_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=DDP_TIMEOUT_ENV):
            collective_timeout()


def test_a_dead_peer_becomes_one_rank_lost_error_and_other_errors_pass(tmp_path: Path) -> None:
    dist = Distributed(2, 0, 0)
    with pytest.raises(RankLostError, match="rank 0 of 2: another rank died") as caught:
        with dist.failures_as_errors(tmp_path):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234")
    assert caught.value.exit_code == 9 and "--resume" in caught.value.hint and caught.value.__cause__ is None
    with pytest.raises(RankLostError, match="stopped by SIGTERM"):
        with dist.failures_as_errors(tmp_path):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    with pytest.raises(RuntimeError, match="a bug"):          # not a peer's failure: unchanged
        with dist.failures_as_errors(tmp_path):
            raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="Connection closed"):   # a world of one has no peers to lose
        with Distributed().failures_as_errors(tmp_path):
            raise RuntimeError("Connection closed by peer")


@pytest.mark.slow
def test_kill_one_rank_then_resume_gives_the_uninterrupted_model(site_options: list[str], tmp_path: Path) -> None:
    straight = _run_to_end(_torchrun_command([*site_options, "--out", str(tmp_path / "straight")], tmp_path / "logs-straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    out, logs = tmp_path / "run", tmp_path / "logs"
    job = subprocess.Popen(_torchrun_command([*site_options, "--out", str(out)], logs), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / CHECKPOINT_DIR / "epoch-000001" / "complete.json").exists():
            assert job.poll() is None, "the job ended before its first checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT_S} s"
            time.sleep(0.05)
        victim = _rank_pid(job.pid, 1)
        assert victim is not None, "rank 1's process not found under torchrun"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        job.communicate(timeout=STOP_WITHIN_S)   # the whole job stops, in bounded time
        assert time.monotonic() - killed_at < STOP_WITHIN_S
    finally:
        _kill_group(job)
    assert job.returncode != 0
    assert not _children(job.pid)
    rank0_err = _rank_log(logs, 0, "stderr")
    errors = [line for line in rank0_err.splitlines() if line.startswith("secure-oneshot: error:")]
    assert len(errors) == 1 and "rank 0 of 2: another rank died or stopped answering" in errors[0], rank0_err[-2000:]
    assert "hint: rerun the same torchrun command with --resume" in rank0_err
    assert "Traceback" not in rank0_err, rank0_err[-3000:]
    assert _rank_log(logs, 0, "stdout") == ""          # no result printed: the run did not finish
    assert not (out / "global.safetensors").exists() and not (out / "report.json").exists() and not (out / "report.md").exists()
    latest = load_latest(out)
    complete = sorted(p.name for p in (out / CHECKPOINT_DIR).glob("epoch-*") if (p / "complete.json").exists())
    assert latest is not None and complete and f"epoch-{latest.epochs_done:06d}" == complete[-1]   # the newest marked one is intact
    assert 1 <= latest.epochs_done < EPOCHS

    resumed = _run_to_end(_torchrun_command([*site_options, "--out", str(out), "--resume"], tmp_path / "logs-resumed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (load_file(p / "global.safetensors") for p in (tmp_path / "straight", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

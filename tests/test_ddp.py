"""``distill`` under ``torch.distributed.run``: ranks, seeds, DDP on gloo, rank 0 alone writing, resume on every rank."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secure_oneshot.cli import main
from secure_oneshot.errors import ConfigError
from secure_oneshot.server.checkpoint import CHECKPOINT_DIR
from secure_oneshot.server.distributed import RANK_SEED_STRIDE, Distributed, image_digest
from secure_oneshot.server.synthesis import InversionConfig

from .model_helpers import make_real_model_dir

OUTPUTS = ["checkpoint", "global.safetensors", "report.json", "report.md", "synthetic.png"]
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def site_options(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("sites")
    return [a for name in ("site-a", "site-b") for a in ("--model", str(make_real_model_dir(root / name, site=name)))]


def _torchrun(nproc: int, args: list[str], log_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--log-dir", str(log_dir), "--redirects", "3", "-m", "secure_oneshot", "distill", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


def _rank_log(log_dir: Path, rank: int, stream: str) -> str:
    [log] = log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
    return log.read_text()


def test_rank_zero_of_one_is_the_plain_command_and_other_ranks_get_their_own_seeds() -> None:
    synth = InversionConfig(batch_size=32, seed=7)
    assert Distributed().inversion(synth) is synth
    assert Distributed.from_env().world_size >= 1
    rank0, rank1 = (Distributed(2, r, r).inversion(synth) for r in (0, 1))
    assert (rank0.batch_size, rank0.seed) == (16, 7)                       # faithful: the method's batch split
    assert (rank1.batch_size, rank1.seed) == (16, 7 + RANK_SEED_STRIDE)
    assert dataclasses.replace(rank0, batch_size=32, seed=7) == synth       # nothing else changes
    assert Distributed(2, 1, 1, "throughput").inversion(synth).batch_size == 32
    with pytest.raises(ConfigError, match="does not divide evenly"):
        Distributed(3, 0, 0).inversion(synth)
    with pytest.raises(ConfigError, match="does not fit a world"):
        Distributed(2, 2, 0)
    assert image_digest(torch.zeros(2, 1, 4, 4)) != image_digest(torch.ones(2, 1, 4, 4)) and image_digest(None) == ""


def test_a_bad_torchrun_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match=r"\$WORLD_SIZE must be an integer"):
        Distributed.from_env()


def test_ranks_of_one_machine_share_its_cpus_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import secure_oneshot._internal.threads as threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Distributed(4, 1, 1).threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert Distributed(32, 1, 1).threads() == 1


@pytest.mark.slow
def test_world_size_one_under_torchrun_is_the_plain_run_bit_for_bit(site_options: list[str], tmp_path: Path) -> None:
    options = [*site_options, "--preset", "smoke", "--device", "cpu", "--threads", "1"]
    torch.set_num_threads(1)
    assert main(["distill", *options, "--out", str(tmp_path / "plain")]) == 0
    launched = _torchrun(1, [*options, "--out", str(tmp_path / "ddp1")], tmp_path / "logs")
    assert launched.returncode == 0, launched.stderr[-2000:]
    plain, ddp1 = (load_file(tmp_path / name / "global.safetensors") for name in ("plain", "ddp1"))
    assert plain.keys() == ddp1.keys() and all(torch.equal(plain[k], ddp1[k]) for k in plain)


@pytest.mark.slow
def test_two_gloo_ranks_train_on_their_own_images_and_only_rank_zero_writes(site_options: list[str], tmp_path: Path) -> None:
    out, logs = tmp_path / "run", tmp_path / "logs"
    options = [*site_options, "--preset", "smoke", "--device", "cpu", "--threads", "1", "--out", str(out)]
    launched = _torchrun(2, options, logs)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS                  # no second copy, no leftover temporaries
    assert sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir()) == ["epoch-000001", "epoch-000002"]
    assert "global model ->" in _rank_log(logs, 0, "stdout") and _rank_log(logs, 1, "stdout") == ""
    assert "distill epoch" not in _rank_log(logs, 1, "stderr")
    report = json.loads((out / "report.json").read_text())
    distributed = report["distributed"]
    assert {k: distributed[k] for k in ("world_size", "mode", "per_rank_batch", "global_batch")} == \
        {"world_size": 2, "mode": "faithful", "per_rank_batch": 16, "global_batch": 32}
    epochs = distributed["rank_image_sha256"]
    assert len(epochs) == 2 and all(len(set(ranks)) == 2 and all(len(d) == 64 for d in ranks) for ranks in epochs)
    assert len({d for ranks in epochs for d in ranks}) == 4                  # every rank and epoch its own batch

    # Resume on both ranks from the first epoch's checkpoint: the same global model as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("global.safetensors", "report.json", "report.md", "synthetic.png"):
        (resumed / name).unlink()
    shutil.rmtree(resumed / CHECKPOINT_DIR / "epoch-000002")
    options[-1] = str(resumed)
    launched = _torchrun(2, [*options, "--resume"], tmp_path / "logs-resumed")
    assert launched.returncode == 0, launched.stderr[-2000:]
    straight, again = (load_file(p / "global.safetensors") for p in (out, resumed))
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    assert json.loads((resumed / "report.json").read_text())["distributed"]["rank_image_sha256"] == epochs

"""The demo's server half under torchrun: ``demo --stop-after ingest`` leaves the accepted bundles and prints the
``torchrun ... distill`` command, which ends with the one-step demo's global model; under several ranks the demo
and a study refuse before writing anything (every rank would train and write its own hospitals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secure_oneshot.cli import main
from secure_oneshot.demo import DemoConfig, server_command

from .data_helpers import thinned_root
from .test_data_root import data_root  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TIMEOUT_S = 300
SMOKE = ["--preset", "smoke", "--device", "cpu", "--threads", "1", "--no-tamper"]


def test_the_server_command_is_the_demos_distillation() -> None:
    cfg = DemoConfig(out=Path("run"), preset="smoke", data_root="data", seed=3, public_fraction=0.2, teacher_weighting="equal")
    args = server_command(cfg)
    options = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "distill" and len(args) % 2 == 1
    assert options == {"--server-dir": "run/server", "--key": "run/keys/server.key", "--trust": "run/keys/trust.toml",
                       "--preset": "smoke", "--seed": "3", "--synthesis": "proxy", "--eval": "pneumoniamnist",
                       "--out": "run/server/global", "--data-root": "data", "--teacher-weighting": "equal",
                       "--proxy-images": "run/server/public-images.npz"}
    assert "--proxy-images" not in server_command(DemoConfig(out=Path("run"), preset="smoke"))


@pytest.mark.parametrize("command", [["demo", "--preset", "smoke", "--stop-after", "ingest"],
                                     ["experiment", "examples/study-quick-cpu.toml"]])
def test_several_ranks_are_refused_before_anything_is_written(command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    out = tmp_path / "out"
    assert main([*command, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "not under torchrun with several ranks" in err and "--stop-after ingest" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_the_two_step_demo_under_torchrun_gives_the_one_step_global_model(data_root, tmp_path: Path,  # noqa: F811
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SECURE_ONESHOT_CALIBRATE", "off")
    one_step, two_step = tmp_path / "one-step", tmp_path / "two-step"
    data = thinned_root(data_root, tmp_path / "data", "pneumoniamnist", every=4)  # protocol, not utility: fewer records
    assert main(["demo", *SMOKE, "--no-centralised", "--data-root", str(data), "--out", str(one_step)]) == 0
    capsys.readouterr()
    assert main(["--json", "demo", *SMOKE, "--stop-after", "ingest", "--data-root", str(data), "--out", str(two_step)]) == 0
    printed = json.loads(capsys.readouterr().out)
    server = two_step / "server"
    assert len(list((server / "accepted").iterdir())) >= 3 and not (server / "global").exists()
    assert not (two_step / "results.json").exists()
    assert printed["torchrun"][:5] == ["torchrun", "--standalone", "--nproc-per-node", "1", "-m"]
    assert printed["torchrun"][6:] == printed["server_argv"] and printed["server_argv"][0] == "distill"

    # The printed command, as printed (torchrun's module form), in its own process group so nothing outlives the test.
    command = [sys.executable, "-m", "torch.distributed.run", *printed["torchrun"][1:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "SECURE_ONESHOT_CALIBRATE": "off", "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode == 0, stderr[-2000:]
    assert "global model ->" in stdout
    a, b = (load_file(run / "server" / "global" / "global.safetensors") for run in (one_step, two_step))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the server half audited its distillation like the one-step demo's
    assert any(json.loads(line)["action"] == "distill" for line in (server / "audit.jsonl").read_text().splitlines())

"""``--threads`` on the long commands, and ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch's OpenMP library loads, so the tests run the CLI
in a fresh interpreter with an import hook that records the variable at the moment ``torch`` is
first imported: setting it any later would have no effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from secure_oneshot._internal.threads import apply_threads, available_cpus
from secure_oneshot.cli import build_parser
from secure_oneshot.errors import ConfigError

LONG_COMMANDS = ("train", "distill", "demo", "experiment", "audit-privacy")

# Runs `secure-oneshot ARGS` in-process after installing a finder that notes OMP_WAIT_POLICY when torch is imported.
PROBE = textwrap.dedent("""
    import json, os, sys
    seen = {}
    class Spy:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and "at_torch_import" not in seen:
                seen["at_torch_import"] = os.environ.get("OMP_WAIT_POLICY")
            return None
    sys.meta_path.insert(0, Spy())
    from secure_oneshot.cli import main
    code = main(sys.argv[1:])
    import torch
    seen.update(code=code, threads=torch.get_num_threads())
    print("PROBE " + json.dumps(seen), file=sys.stderr)
""")


def run_probe(args: list[str], env_policy: str | None = None, tmp_path=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stderr[-2000:]
    return {**json.loads(lines[-1][len("PROBE "):]), "stderr": done.stderr}


@pytest.mark.parametrize("command", LONG_COMMANDS)
def test_every_long_command_has_threads(command):
    sub = build_parser(command)._subparsers._group_actions[0].choices[command]
    assert "--threads" in {option for action in sub._actions for option in action.option_strings}
    required = {"experiment": ["x.toml"], "train": ["--config", "x.toml"], "audit-privacy": ["--model", "m"]}
    assert sub.parse_args(["--threads", "3", *required.get(command, [])]).threads == 3


def test_distill_sets_passive_wait_policy_before_torch_loads_and_applies_threads(tmp_path):
    # No site models: the command stops with a ConfigError after --threads was applied, before any work.
    seen = run_probe(["distill", "--threads", "1"], tmp_path=tmp_path)
    assert seen["at_torch_import"] == "PASSIVE"
    assert seen["code"] == 3
    assert seen["threads"] == 1


def test_an_explicit_wait_policy_is_kept(tmp_path):
    seen = run_probe(["distill", "--threads", "1"], env_policy="ACTIVE", tmp_path=tmp_path)
    assert seen["at_torch_import"] == "ACTIVE"


def test_train_sets_passive_wait_policy_before_torch_loads(tmp_path):
    seen = run_probe(["train", "--config", str(tmp_path / "missing.toml"), "--threads", "1"], tmp_path=tmp_path)
    assert seen["at_torch_import"] == "PASSIVE"
    assert seen["code"] not in (0, 1)


def test_zero_threads_is_a_config_error_with_exit_3(capsys):
    from secure_oneshot.cli import main

    assert main(["distill", "--threads", "0", "--model", "nowhere"]) == 3
    err = capsys.readouterr().err
    assert "--threads must be an integer >= 1" in err
    assert "Traceback" not in err


def test_apply_threads_defaults_to_the_affinity_mask_and_refuses_nonsense():
    import torch

    before = torch.get_num_threads()
    try:
        assert apply_threads(None) == available_cpus() == torch.get_num_threads()
        assert apply_threads(1) == 1 == torch.get_num_threads()
        for bad in (0, -2, True, 1.5):
            with pytest.raises(ConfigError):
                apply_threads(bad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_available_cpus_follows_the_affinity_mask_not_the_core_count():
    probe = "from secure_oneshot._internal.threads import available_cpus; print(available_cpus())"
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip("taskset unavailable: " + done.stderr[-200:])
    assert done.stdout.strip() == "1"

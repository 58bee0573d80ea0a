"""The demo's hospitals trained in worker processes (client.parallel_sites over _internal.process_pool).

With one torch thread per worker, every site's model files must be the bytes the sequential in-process path writes
(same seeds); a failing worker must end the run with its own error class and exit code, and an interrupted run must
leave no worker behind.  Small generated MedMNIST-format data and the smoke preset keep this to seconds.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secure_oneshot._internal.process_pool import run_jobs
from secure_oneshot.client.parallel_sites import site_from_job, site_job
from secure_oneshot.demo import DEMO_PRESETS, DemoConfig, _train_sites, centralised_reference, demo_partition, server_command
from secure_oneshot.errors import ConfigError, DataError, ResourceError, SecureOneshotError

from .pool_tasks import exits_at_once, fails_with_data_error, returns_a_tuple, sleeps
from .test_data import write_fake_medmnist

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

NAMES = ["hospital-1", "hospital-2", "hospital-3"]


def _model_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "sites").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_fake_medmnist(data, "pneumoniamnist", n_classes=2, channels=1, n=120)
    return DemoConfig(out=Path("unused"), data_root=str(data), preset="smoke", alpha=math.inf), DEMO_PRESETS["smoke"]


def _train(smoke, run: Path, workers: int, reference: bool = False):
    cfg, preset = smoke
    run.mkdir()
    partition = demo_partition(cfg, preset, run)
    lines: list[str] = []
    dirs, pooled = _train_sites(cfg, preset, partition, NAMES, run, lines.append, workers, reference=reference)
    return dirs, pooled, lines, partition


def test_workers_write_the_sequential_paths_model_files_bit_for_bit(smoke, tmp_path, one_torch_thread) -> None:
    cfg, preset = smoke
    dirs_seq, _, lines_seq, partition = _train(smoke, tmp_path / "seq", workers=1)
    dirs_par, pooled, lines_par, _ = _train(smoke, tmp_path / "par", workers=2, reference=True)
    seq, par = _model_files(tmp_path / "seq"), _model_files(tmp_path / "par")
    assert any(name.endswith(".safetensors") for name in seq)
    assert set(seq) == set(par)
    differing = [name for name in seq if seq[name] != par[name]]
    assert differing == []
    assert [d.relative_to(tmp_path / "par") for d in dirs_par] == [d.relative_to(tmp_path / "seq") for d in dirs_seq]
    # one progress line per hospital on both paths (the pool's in completion order): the same facts but the seconds
    strip = lambda line: line.rsplit(" (", 1)[0]  # noqa: E731
    sites_par = [line for line in lines_par if "centralised reference" not in line]
    assert sorted(map(strip, sites_par)) == sorted(map(strip, lines_seq)) and len(sites_par) == len(NAMES)
    # the centralised reference as one more job of the pool: the in-process numbers
    assert pooled == centralised_reference(cfg, preset, partition)
    assert set(pooled) == {"acc", "auc", "balanced_acc"} and len(lines_par) == len(NAMES) + 1


def test_a_failing_worker_raises_its_own_error_class_message_and_hint() -> None:
    with pytest.raises(DataError, match="site 2: no records") as caught:
        run_jobs([(sleeps, {"seconds": 0.0}), (fails_with_data_error, {"site": 2})], workers=2)
    assert caught.value.hint == "check the partition" and caught.value.exit_code == DataError.exit_code == 15
    assert multiprocessing.active_children() == []


def test_an_interrupt_stops_every_worker() -> None:
    seen: list[int] = []

    def interrupt(index: int, result: dict) -> None:
        seen.append(index)
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_jobs([(sleeps, {"seconds": 0.0}), (sleeps, {"seconds": 300.0})], workers=2, on_done=interrupt)
    assert seen == [0]
    assert multiprocessing.active_children() == []   # the sleeping worker was terminated, not left to finish
    assert time.monotonic() - started < 120


def test_only_plain_values_cross_the_process_boundary(smoke, tmp_path) -> None:
    with pytest.raises(TypeError, match="only plain values"):
        run_jobs([(sleeps, {"seconds": Path("1")})], workers=2)   # refused before any process starts
    with pytest.raises(TypeError, match="only plain values"):
        run_jobs([(returns_a_tuple, {})], workers=1)   # a result too (a bug, not an expected failure)
    assert multiprocessing.active_children() == []
    cfg, preset = smoke
    from secure_oneshot.demo import _site_config

    site = _site_config(cfg, preset, demo_partition(cfg, preset, tmp_path), 1, "hospital-2", tmp_path)
    assert site_from_job(site_job(site)) == site   # the job rebuilds exactly the config (tuples included)


def test_a_site_that_fails_in_a_worker_raises_what_the_sequential_path_raises(smoke, tmp_path) -> None:
    """The data file goes missing after the partition: each worker's own error, not a pool traceback; no worker left."""
    cfg, preset = smoke
    data = tmp_path / "data"
    write_fake_medmnist(data, "pneumoniamnist", n_classes=2, channels=1, n=120)
    cfg = DemoConfig(out=cfg.out, data_root=str(data), preset="smoke", alpha=math.inf)
    caught = []
    for workers in (1, 2):
        run = tmp_path / f"run-{workers}"
        run.mkdir()
        partition = demo_partition(cfg, preset, run)
        (data / "pneumoniamnist.npz").rename(data / "moved.npz")
        with pytest.raises(SecureOneshotError) as error:
            _train_sites(cfg, preset, partition, NAMES, run, print, workers, reference=False)
        (data / "moved.npz").rename(data / "pneumoniamnist.npz")
        caught.append((type(error.value), error.value.message, error.value.exit_code))
    assert caught[0] == caught[1] and caught[0][2] in (DataError.exit_code, ConfigError.exit_code)
    assert multiprocessing.active_children() == []


def test_the_dp_demo_distils_for_its_named_number_of_epochs(tmp_path) -> None:
    dp = DemoConfig(out=tmp_path, preset="cpu", dp_epsilon=8.0)
    assert dp.server_epochs == DEMO_PRESETS["cpu"].dp_server_epochs == 6
    assert DemoConfig(out=tmp_path, preset="cpu").server_epochs is None   # without DP: the server preset's 16
    assert DemoConfig(out=tmp_path, preset="paper", dp_epsilon=8.0).server_epochs is None   # paper keeps its own
    args = server_command(dp)
    assert args[args.index("--epochs") + 1] == "6"   # the printed server half distils the same job
    assert "--epochs" not in server_command(DemoConfig(out=tmp_path, preset="cpu"))
    with pytest.raises(Exception, match="workers"):
        DemoConfig(out=tmp_path, workers=0)


def test_the_cpu_dp_demo_holds_public_images_at_the_server_unless_told_otherwise(tmp_path) -> None:
    """With DP the cpu demo sets DP_DEMO_PUBLIC_FRACTION of the records aside for the server (proxy synthesis and prior
    matching on them); ``public_fraction=0`` is the data-free method; without DP, and on the other presets, nothing changes."""
    from secure_oneshot.demo import DP_DEMO_PUBLIC_FRACTION

    dp = DemoConfig(out=tmp_path, preset="cpu", dp_epsilon=8.0)
    assert dp.resolved_public_fraction == DP_DEMO_PUBLIC_FRACTION > 0 and dp.resolved_synthesis == "proxy"
    args = server_command(dp)
    assert args[args.index("--synthesis") + 1] == "proxy" and args[args.index("--proxy-images") + 1].endswith("public-images.npz")
    data_free = DemoConfig(out=tmp_path, preset="cpu", dp_epsilon=8.0, public_fraction=0.0)
    assert data_free.resolved_public_fraction == 0 and data_free.resolved_synthesis == "inversion"
    assert "--proxy-images" not in server_command(data_free)
    asked = DemoConfig(out=tmp_path, preset="cpu", dp_epsilon=8.0, synthesis="inversion")   # no records set aside for nothing
    assert asked.resolved_public_fraction == 0 and "--proxy-images" not in server_command(asked)
    for other in (DemoConfig(out=tmp_path, preset="cpu"), DemoConfig(out=tmp_path, preset="smoke", dp_epsilon=8.0),
                  DemoConfig(out=tmp_path, preset="paper", dp_epsilon=8.0)):
        assert other.resolved_public_fraction == 0 and other.resolved_synthesis == "inversion"
    assert DemoConfig(out=tmp_path, preset="cpu", public_fraction=0.2).resolved_public_fraction == 0.2   # as given, DP or not


def test_a_worker_killed_from_outside_is_a_resource_error() -> None:
    with pytest.raises(ResourceError, match="worker process died"):
        run_jobs([(exits_at_once, {})], workers=1)
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses pgrep")
def test_ctrl_c_on_the_whole_process_group_leaves_no_worker() -> None:
    """A terminal's Ctrl-C reaches every process of the group: the workers ignore it, the parent stops them."""
    script = ("from tests.pool_tasks import sleeps\nfrom secure_oneshot._internal.process_pool import run_jobs\n"
              "run_jobs([(sleeps, {'seconds': 300.0}), (sleeps, {'seconds': 300.0})], workers=2)\n")
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-c", script], cwd=root, start_new_session=True, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        workers: list[str] = []
        deadline = time.monotonic() + 60
        while len(workers) < 3 and time.monotonic() < deadline:   # two workers and multiprocessing's resource tracker
            time.sleep(0.2)
            workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2, "the workers did not start"
        time.sleep(1.0)   # past the workers' start-up, into their jobs
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)
        assert process.returncode != 0 and b"KeyboardInterrupt" in process.stderr.read()  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)

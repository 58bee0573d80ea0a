"""Shared fixtures: identities, a trust store, and small bundles sealed in memory.

A fake site and server in one process (TUF's RepositorySimulator idea): every
test gets fresh keys, so no test depends on another's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from secure_oneshot.bundle import seal_tensors
from secure_oneshot.bundle.arrays import to_torch
from secure_oneshot.keys import Identity, TrustEntry, TrustStore

MEDMNIST_ROOT = Path(os.environ.get("SECURE_ONESHOT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"))
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
SMALL_CHUNK = 1 << 16


def _make_vector_keys_private() -> None:
    """Git records no read permissions, so a checkout leaves the test-only private keys 0644;
    key loaders refuse that (as ssh does), so give them the mode every private key has.
    Done when this conftest is imported, because some test modules load the keys at import."""
    for key in (Path(__file__).parent / "vectors" / "keys").glob("*.key"):
        key.chmod(0o600)


_make_vector_keys_private()


# The suite's longest test files, longest first (one worker's seconds in the last full run, on 2 shared cores:
# 680, 533, 363, 363, 322, 172, 169, 165, 131, 119, 114, 110, 102, 83, 83, 74).  Under `-n 2 --dist loadfile
# --no-loadscope-reorder` (pyproject addopts) a file is one scheduling unit and units go out in collection order:
# these start first, so the many short files fill the other worker meanwhile and the two finish together.  (xdist's
# default reorder hands out files with the most tests first, which left these to run alone at the end.)  Only whole
# files move: the tests inside a file keep their order.
LONGEST_FILES = (
    "test_privacy_audit_generator.py",
    "test_experiment_generators.py",
    "test_dp_distill.py",
    "test_privacy_audit.py",
    "test_generator.py",
    "test_train.py",
    "test_distill_real.py",
    "test_demo.py",
    "test_ddp_failure.py",
    "test_flower.py",
    "test_ddp.py",
    "test_experiment.py",
    "test_label_counts.py",
    "test_demo_parallel.py",
    "test_demo_torchrun.py",
    "test_resume.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the other files keep their order


@dataclass
class Parties:
    site: Identity
    server: Identity
    escrow: Identity
    outsider: Identity
    trust: TrustStore


@pytest.fixture(scope="session")
def parties() -> Parties:
    site, server, escrow, outsider = (Identity.generate(n) for n in ("site-a", "server", "escrow", "outsider"))
    trust = TrustStore().with_entry(TrustEntry(site.public, frozenset({"sender"})))
    return Parties(site, server, escrow, outsider, trust)


def sample_tensors(seed: int = 0, big: bool = False) -> dict[str, torch.Tensor]:
    """Mixed dtypes and shapes, including empty and 0-d tensors; ``big`` spans several 64 KiB chunks."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(8, generator=g, dtype=torch.float64),
        "fc.weight": torch.randn(2, 8, generator=g).to(torch.bfloat16),
        "fc.bias": torch.randn(2, generator=g).to(torch.float16),
        "steps": torch.tensor(1234, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "codes": torch.randint(-128, 127, (5,), generator=g, dtype=torch.int8),
        "pixels": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8),
        "empty": torch.zeros(0, 7),
        "i16": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "i32": torch.arange(3, dtype=torch.int32),
    }
    if big:
        tensors["big"] = torch.randn(3 * SMALL_CHUNK // 4 + 123, generator=g)  # ~3 chunks
    return tensors


def seal_sample(parties: Parties, out: Path, *, recipients=None, big: bool = True, now: datetime = NOW, **kwargs):
    """Seal ``sample_tensors`` from the site to ``recipients`` (default: the server)."""
    recipients = recipients or [parties.server.public]
    return seal_tensors(
        sample_tensors(big=big), out, sender=parties.site, recipients=recipients,
        now=now, chunk_size=SMALL_CHUNK, **kwargs,
    )


@pytest.fixture()
def sealed(parties: Parties, tmp_path: Path) -> Path:
    """A multi-chunk bundle from the site to the server, created at NOW, valid 7 days."""
    out = tmp_path / "bundle.sob"
    seal_sample(parties, out)
    return out


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes as stored (bit-identity, including NaN payloads and signed zeros)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """``got`` may be what a bundle opens to (NumPy arrays): compared as the torch tensors they convert to."""
    assert sorted(got) == sorted(want)
    got = {name: to_torch(tensor) for name, tensor in got.items()}
    for name, tensor in want.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        assert raw_bytes(got[name]) == raw_bytes(tensor), name


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: with 2 threads on a busy 2-core machine, OpenMP waits make calls far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def torch_threads_shared_between_workers():
    """Each xdist worker is a process of its own, and torch's default is a thread per core in each: two workers on
    two cores then keep four threads on two cores.  Each worker gets its share of the cores instead (measured on
    tests/test_generator.py beside a busy core: 119 CPU-s with one thread against 131 with two, same results).
    Commands run through the CLI still set their own threads (``--threads``, default: every core), as they do in use."""
    from secure_oneshot._internal.threads import available_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = torch.get_num_threads()
    share = max(1, available_cpus() // workers)
    if share < threads:
        torch.set_num_threads(share)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def private_calibration_cache(tmp_path_factory):
    """Distillations measure precision and layout and cache the choice: in a folder of this test session, not ~/.cache.

    And they do not measure at all (``SECURE_ONESHOT_CALIBRATE=off``): a measured choice can flip between layouts
    of near-equal speed with the machine's load, and the real-data tests must compute the same numbers on every
    run.  ``tests/test_calibration.py`` switches it back on where it tests the measured path.
    """
    saved = {name: os.environ.get(name) for name in ("SECURE_ONESHOT_CACHE", "SECURE_ONESHOT_CALIBRATE")}
    os.environ["SECURE_ONESHOT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["SECURE_ONESHOT_CALIBRATE"] = "off"
    yield
    for name, previous in saved.items():
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous

"""Nothing half-written: a failure in the middle of writing leaves no partial bundle or key file."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_oneshot.bundle import open_bundle
from secure_oneshot.bundle import stream as stream_module
from secure_oneshot.keys import FAST_INSECURE_KDF, Identity, save_identity
from secure_oneshot.keys import keyfile as keyfile_module

from .conftest import NOW, seal_sample


class Injected(RuntimeError):
    """The failure we inject; a real one would be a full disk or a killed process."""


def _fail_after(monkeypatch, target, name: str, calls: int) -> None:
    original = getattr(target, name)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Injected("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failure_mid_bundle_leaves_nothing(parties, tmp_path: Path, monkeypatch) -> None:
    _fail_after(monkeypatch, stream_module.StreamWriter, "_emit", calls=2)  # after two chunks are on disk
    with pytest.raises(Injected):
        seal_sample(parties, tmp_path / "b.sob")
    assert _leftovers(tmp_path) == []


def test_failure_mid_bundle_keeps_the_previous_bundle(parties, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "b.sob"
    seal_sample(parties, out)
    before = out.read_bytes()
    _fail_after(monkeypatch, stream_module.StreamWriter, "_emit", calls=1)
    with pytest.raises(Injected):
        seal_sample(parties, out)
    assert out.read_bytes() == before and _leftovers(tmp_path) == ["b.sob"]
    open_bundle(out, parties.server, parties.trust, now=NOW)


def test_failure_while_writing_key_leaves_no_key_file(tmp_path: Path, monkeypatch) -> None:
    # The private key is written first, then the public file: fail on the second write.
    _fail_after(monkeypatch, keyfile_module, "atomic_write_bytes", calls=1)
    with pytest.raises(Injected):
        save_identity(Identity.generate("site"), tmp_path, b"pw", kdf=FAST_INSECURE_KDF)
    # The .key landed whole, then the .pub failed: the new private key is rolled back.
    assert _leftovers(tmp_path) == []


def test_failure_inside_the_atomic_writer_leaves_no_partial_key(tmp_path: Path, monkeypatch) -> None:
    import os

    from secure_oneshot._internal import atomic

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(Exception, match="No space left"):
        save_identity(Identity.generate("site"), tmp_path, b"pw", kdf=FAST_INSECURE_KDF)
    monkeypatch.setattr(atomic.os, "fsync", os.fsync)
    assert _leftovers(tmp_path) == []

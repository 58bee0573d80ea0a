"""``ingest`` against an attacker who controls the inbox: its files' contents, names, types, sizes and timing.

Each test plants one good bundle among hostile entries and checks that the good one is accepted from the very
bytes that were verified, that every hostile entry is set aside with a reason, and that nothing escapes onto the
operator's terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from secure_oneshot.bundle import inspect_bundle
from secure_oneshot.cli import main
from secure_oneshot.errors import QuarantinedBundlesError, ResourceError
from secure_oneshot.server import ingest as ingest_module
from secure_oneshot.server.ingest import IngestFolders
from secure_oneshot.server.registry import server_lock

from .conftest import NOW
from .ingest_helpers import CAST, reasons, run_ingest, seal, server_cli_args
from .policy_helpers import POLICIES

MAGIC = b"secure-oneshot/v1\n"
LONG_NAME = "L" * 236 + ".sob"  # 240 characters: with ".reason.json" appended it would exceed NAME_MAX
FORGED_NAME = "evil\n  accepted     forged.sob\x1b[31m\x1b]0;owned\x07.sob"
BAD_UTF8_NAME = b"bad-\xff\xfe.sob"


def _with_header(bundle: bytes, edit) -> bytes:
    """``bundle`` with its header JSON replaced by ``edit(header_json)`` (MAC and stream left as they were)."""
    length = int.from_bytes(bundle[len(MAGIC):len(MAGIC) + 4], "big")
    body = bundle[len(MAGIC) + 4:len(MAGIC) + 4 + length]
    new = edit(body)
    return MAGIC + len(new).to_bytes(4, "big") + new + bundle[len(MAGIC) + 4 + length:]


def plant_hostile_inbox(root: Path, now: datetime = NOW) -> dict[str, tuple[str, str]]:
    """One good bundle (sealed at ``now``) and one entry of each hostile kind; returns shown name -> (error class, what
    the reason says)."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    good = seal(inbox / "0-good.sob", now=now).read_bytes()
    (root / "elsewhere").mkdir()
    outside = seal(root / "elsewhere" / "linked.sob", seed=1)
    (inbox / "1-deep-header.sob").write_bytes(MAGIC + (64000).to_bytes(4, "big") + b"[" * 32000 + b"]" * 32000 + bytes(32))
    (inbox / "2-huge-claim.sob").write_bytes(_with_header(good, lambda h: _claim(h, 1 << 35)))
    with open(inbox / "3-sparse.sob", "wb") as f:
        f.truncate(8 << 40)
    os.mkfifo(inbox / "x.sob")
    os.symlink(outside, inbox / "y.sob")
    os.symlink("/etc/passwd", inbox / "z.sob")
    os.replace(seal(root / "long.sob", sender=CAST.outsider, now=now), inbox / LONG_NAME)  # sealed aside: its temp name would be too long
    (inbox / FORGED_NAME).write_bytes(b"not a bundle")
    with open(os.path.join(os.fsencode(inbox), BAD_UTF8_NAME), "wb") as f:
        f.write(b"also not a bundle")
    return {
        "1-deep-header.sob": ("BundleFormatError", "header"), "2-huge-claim.sob": ("BundleFormatError|BundleAuthError", str(1 << 35)),
        "3-sparse.sob": ("BundleFormatError", "largest possible bundle"), "x.sob": ("BundleFormatError", "a FIFO"),
        "y.sob": ("BundleFormatError", "a symbolic link"), "z.sob": ("BundleFormatError", "a symbolic link"),
        LONG_NAME: ("TrustError", "not in the trust store"),
        "evil\\x0a  accepted     forged.sob\\x1b[31m\\x1b]0;owned\\x07.sob": ("BundleFormatError", "bad magic"),
        "bad-\\xff\\xfe.sob": ("BundleFormatError", "bad magic"),
    }


def _claim(header: bytes, size: int) -> bytes:
    obj = json.loads(header)
    obj["payload_size"] = size
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _check_hostile_run(root: Path, expected: dict[str, tuple[str, str]]) -> None:
    folders = IngestFolders.under(root)
    by_name = reasons(folders)
    assert sorted(by_name) == sorted(expected)
    for name, (error, says) in expected.items():
        # a claim the file cannot hold is refused by the reader (format or truncation) before anything is allocated
        assert by_name[name]["error"] in error.split("|") and says in by_name[name]["message"], (name, by_name[name])
    assert os.listdir(folders.inbox) == []  # everything was either accepted or set aside
    sparse = folders.root / by_name["3-sparse.sob"]["stored_as"]
    assert sparse.stat().st_size == 8 << 40 and sparse.stat().st_blocks == 0  # renamed, never read or copied
    assert os.path.islink(folders.root / by_name["z.sob"]["stored_as"])  # the link itself moved, its target untouched
    assert (root / "elsewhere" / "linked.sob").is_file()
    assert by_name["bad-\\xff\\xfe.sob"]["file_name_hex"] == BAD_UTF8_NAME.hex()
    (accepted,) = folders.accepted.glob("*.sob")
    entry = json.loads(accepted.with_suffix(".json").read_text())
    assert entry["received_as"] == "0-good.sob"
    assert entry["file_sha256"] == hashlib.sha256(accepted.read_bytes()).hexdigest()


@pytest.fixture()
def deadline():
    """Fail instead of hanging: a blocked open() of a FIFO would never return."""
    def hung(signum, frame):
        raise AssertionError("ingest hung (a FIFO was opened for reading?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_hostile_inbox_from_the_command_line(tmp_path: Path, capsys, deadline) -> None:
    """No traceback, no raw escape, no forged row; the exit status says some entries were quarantined."""
    expected = plant_hostile_inbox(tmp_path, now=datetime.now(timezone.utc))   # the command checks validity by the clock
    code = main(["ingest", "--server-dir", str(tmp_path), "--policy", str(POLICIES / "server-ingest.toml"), *server_cli_args(tmp_path)])
    out, err = capsys.readouterr()
    assert code == QuarantinedBundlesError.exit_code == 16, err
    assert "Traceback" not in err and "error" not in err  # only the test key's "not passphrase-protected" warning
    lines = out.splitlines()
    assert lines[0].endswith("1 accepted, 9 quarantined")
    assert len(lines) == 1 + 10  # one row per entry: no name or reason adds a row
    assert not any(ch in out for ch in "\x1b\x07\r") and not any(line.startswith("  accepted     forged") for line in lines)
    assert any("evil\\x0a  accepted     forged.sob\\x1b[31m" in line for line in lines)
    assert max(len(line) for line in lines) < 500
    _check_hostile_run(tmp_path, expected)


def test_hostile_inbox_in_process_outcomes(tmp_path: Path, deadline) -> None:
    expected = plant_hostile_inbox(tmp_path)
    _, outcomes = run_ingest(tmp_path)
    assert [o.file for o in outcomes if o.outcome == "accepted"] == ["0-good.sob"]
    assert sorted(o.file for o in outcomes if o.outcome == "quarantined") == sorted(expected)
    assert all("\n" not in o.file + o.reason and "\x1b" not in o.file + o.reason for o in outcomes)
    _check_hostile_run(tmp_path, expected)


@pytest.mark.parametrize("exception", [RecursionError("maximum recursion depth exceeded"), TypeError("'NoneType' is not subscriptable"),
                                       MemoryError(), ValueError("bad\nvalue\x1b[2J"), OSError(36, "File name too long")])
def test_an_unexpected_exception_sets_one_entry_aside_and_the_next_is_accepted(tmp_path: Path, monkeypatch, exception) -> None:
    (tmp_path / "inbox").mkdir()
    delivered = seal(tmp_path / "inbox" / "a.sob").read_bytes()
    seal(tmp_path / "inbox" / "b.sob", seed=1)
    calls = []

    def inspect_once_broken(path):
        calls.append(path)
        if len(calls) == 1:
            raise exception
        return inspect_bundle(path)

    monkeypatch.setattr(ingest_module, "inspect_bundle", inspect_once_broken)
    folders, outcomes = run_ingest(tmp_path)
    assert [(o.file, o.outcome) for o in outcomes] == [("a.sob", "quarantined"), ("b.sob", "accepted")]
    reason = reasons(folders)["a.sob"]
    assert reason["error"] == type(exception).__name__ and reason["exit_code"] == 1
    assert reason["message"].startswith(f"internal error while processing: {type(exception).__name__}")
    assert "\n" not in reason["message"] and "\x1b" not in reason["message"]
    assert (folders.root / reason["stored_as"]).read_bytes() == delivered  # the entry's bytes, kept as evidence
    assert os.listdir(folders.staging) == [] and os.listdir(folders.inbox) == []


def _replace_inbox_file_during_verification(monkeypatch, inbox_file: Path, replacement: bytes, *, rename: bool) -> None:
    real_open = ingest_module.open_bundle

    def open_while_the_inbox_changes(path, *args, **kwargs):
        if rename:  # a new file (new inode) takes the name
            tmp = inbox_file.with_name(".incoming")
            tmp.write_bytes(replacement)
            os.replace(tmp, inbox_file)
        else:  # the same file rewritten in place
            with open(inbox_file, "r+b") as f:
                f.write(replacement)
                f.truncate()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "open_bundle", open_while_the_inbox_changes)


@pytest.mark.parametrize("rename", [False, True], ids=["rewritten-in-place", "renamed-over"])
def test_what_is_stored_is_what_was_verified(tmp_path: Path, monkeypatch, rename: bool) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    original = seal(inbox / "x.sob").read_bytes()
    other = seal(tmp_path / "other.sob", seed=1).read_bytes()
    _replace_inbox_file_during_verification(monkeypatch, inbox / "x.sob", other, rename=rename)
    folders, outcomes = run_ingest(tmp_path)
    (outcome,) = outcomes
    assert outcome.outcome == "accepted"
    stored = folders.root / outcome.stored_as
    assert stored.read_bytes() == original  # not the bytes that sat under the name afterwards
    entry = json.loads(stored.with_suffix(".json").read_text())
    assert entry["file_sha256"] == hashlib.sha256(original).hexdigest()
    assert entry["bundle_id"] == inspect_bundle(stored).bundle_id == outcome.bundle_id
    if rename:  # a different file took the name: it was not processed, it waits for the next run
        assert outcome.left_in_inbox and (inbox / "x.sob").read_bytes() == other
        monkeypatch.undo()
        _, again = run_ingest(tmp_path)
        assert [o.outcome for o in again] == ["accepted"] and again[0].bundle_id != outcome.bundle_id
    else:
        assert not (inbox / "x.sob").exists()


def test_a_second_run_on_the_same_server_folder_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "inbox").mkdir()
    seal(tmp_path / "inbox" / "a.sob")
    with server_lock(tmp_path):
        with pytest.raises(ResourceError, match="busy") as caught:
            run_ingest(tmp_path)
        assert caught.value.exit_code == 9
        code = main(["ingest", "--server-dir", str(tmp_path), "--policy", str(POLICIES / "server-ingest.toml"), *server_cli_args(tmp_path)])
        assert code == 9 and "busy" in capsys.readouterr().err
    assert (tmp_path / "inbox" / "a.sob").exists() and not (tmp_path / "ledger.db").exists()  # nothing was touched
    _, outcomes = run_ingest(tmp_path)
    assert [o.outcome for o in outcomes] == ["accepted"]


def test_wait_queues_behind_the_running_ingest(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    seal(tmp_path / "inbox" / "a.sob")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with server_lock(tmp_path):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(30)
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(run_ingest(tmp_path, wait=True)))
    waiter.start()
    assert not result  # still queued while the lock is held
    release.set()
    holder.join(30)
    waiter.join(60)
    assert [o.outcome for o in result[0][1]] == ["accepted"]


def test_files_and_folders_written_are_private(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    seal(tmp_path / "inbox" / "a.sob")
    (tmp_path / "inbox" / "b.sob").write_bytes(b"junk")
    folders, _ = run_ingest(tmp_path)
    for folder in (folders.accepted, folders.quarantine, folders.staging):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for path in [*folders.accepted.iterdir(), *folders.quarantine.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o600, path

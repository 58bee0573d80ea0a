"""The hash-chained, signed audit log (``secure_oneshot.audit``) and ``secure-oneshot audit``.

Layout:
  helpers and fixtures
  round trip and the format as documented
  one test per kind of tampering (edit, delete, insert, duplicate, reorder,
  truncate, non-JSON, wrong format, non-canonical), and expect_head
  property tests (hypothesis): any single byte flip is caught; events round-trip
  crash safety and concurrency (two processes appending at once)
  the CLI, in-process (cli/__init__.py does not register `audit` yet)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_oneshot import __version__
from secure_oneshot import audit
from secure_oneshot._internal.encoding import b64encode, canonical_json
from secure_oneshot.audit import (
    AUDIT_FORMAT,
    GENESIS_PREV,
    AuditEvent,
    append_event,
    encode_record,
    head,
    read_log,
    signing_message,
    verify_log,
)
from secure_oneshot.cli.audit_cmd import register
from secure_oneshot.errors import AuditLogError, ResourceError
from secure_oneshot.keys import Identity

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
SHA_A = "a" * 64
SHA_B = "b" * 64
RECORD_FIELDS = {
    "format", "seq", "time", "actor", "actor_name", "action", "outcome", "reason", "bundle_id",
    "payload_sha256", "policy_id", "policy_version", "policy_sha256", "recipients", "dp", "details",
    "version", "prev", "sig",
}


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def site() -> Identity:
    return Identity.generate("site-a")


@pytest.fixture(scope="module")
def outsider() -> Identity:
    return Identity.generate("outsider")


def five_events(server_id: str) -> list[AuditEvent]:
    """Five events that differ in every optional field."""
    return [
        AuditEvent("policy-sign", "ok", reason="approved by the privacy office", policy_id="pneumonia-export",
                   policy_version=3, policy_sha256=SHA_A),
        AuditEvent("export", "refused", reason="disk full", policy_id="pneumonia-export", policy_version=3,
                   details={"denied": ["bn1.running_mean"], "rule": 4}),
        AuditEvent("export", "ok", bundle_id="0123456789abcdef0123456789abcdef", payload_sha256=SHA_B,
                   policy_id="pneumonia-export", policy_version=0, recipients=(server_id,),
                   dp={"epsilon": "3.5", "delta": "1e-5", "accountant": "rdp"}),
        AuditEvent("ingest", "error", reason="caf\u00e9 \u2014 non-ASCII text survives", details={"nested": {"a": [1, None, True]}}),
        AuditEvent("export", "ok", reason="", recipients=(server_id, server_id[::-1])),
    ]


@pytest.fixture()
def log(tmp_path: Path, site: Identity, outsider: Identity) -> Path:
    """A log of the five events, one minute apart, written by the site."""
    path = tmp_path / "audit.jsonl"
    for i, event in enumerate(five_events(outsider.key_id)):
        append_event(path, site, event, now=NOW + timedelta(minutes=i))
    return path


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def resign(identity: Identity, line: bytes, **changes: object) -> bytes:
    """``line`` with ``changes`` applied and a fresh, valid signature by ``identity``."""
    fields = {**json.loads(line), **changes}
    del fields["sig"]
    return canonical_json({**fields, "sig": b64encode(identity.sign(signing_message(fields)))})


def expect_bad(path: Path, site: Identity, pattern: str, **kwargs: object) -> AuditLogError:
    with pytest.raises(AuditLogError, match=pattern) as info:
        verify_log(path, site.public, **kwargs)  # type: ignore[arg-type]
    assert info.value.exit_code == 14
    return info.value


# --------------------------------------------------------------------------- round trip and format


def test_round_trip_read_and_verify(log: Path, site: Identity, outsider: Identity) -> None:
    events = five_events(outsider.key_id)
    for records in (read_log(log), verify_log(log, site.public)):
        assert [r.event for r in records] == events
        assert [r.seq for r in records] == [0, 1, 2, 3, 4]
        assert [r.time for r in records] == [f"2026-11-26T12:0{i}:00Z" for i in range(5)]
        assert {(r.actor, r.actor_name, r.version) for r in records} == {(site.key_id, "site-a", __version__)}
        assert [r.line for r in records] == lines_of(log)


def test_append_returns_the_record_as_read(tmp_path: Path, site: Identity) -> None:
    path = tmp_path / "a.jsonl"
    written = [append_event(path, site, AuditEvent("export", "ok", reason=f"n{i}"), now=NOW) for i in range(3)]
    assert written == read_log(path)


def test_lines_are_canonical_and_chained(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    prev = GENESIS_PREV
    for seq, line in enumerate(lines):
        obj = json.loads(line)
        assert canonical_json(obj) == line
        assert set(obj) == RECORD_FIELDS
        assert (obj["format"], obj["seq"], obj["prev"]) == (AUDIT_FORMAT, seq, prev)
        prev = sha256_hex(line)
    assert head(log) == (5, prev) == (5, read_log(log)[-1].hash)


def test_signature_is_over_the_documented_bytes(log: Path, site: Identity) -> None:
    """Re-implement the module docstring's signature rule from scratch."""
    import base64

    for line in lines_of(log):
        obj = json.loads(line)
        signature = base64.b64decode(obj.pop("sig"))
        message = b"secure-oneshot/v1 audit record\x00" + json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        assert site.public.verify(message, signature)


def test_non_ascii_is_escaped(log: Path) -> None:
    assert b"caf\\u00e9 \\u2014" in log.read_bytes()
    assert log.read_bytes().isascii()


def test_new_log_mode_and_lock_file(log: Path) -> None:
    assert stat.S_IMODE(log.stat().st_mode) & ~0o640 == 0
    assert Path(f"{log}.lock").exists()


def test_missing_log(tmp_path: Path, site: Identity) -> None:
    missing = tmp_path / "none.jsonl"
    assert read_log(missing) == []
    assert head(missing) == (0, GENESIS_PREV)
    with pytest.raises(AuditLogError, match="does not exist"):
        verify_log(missing, site.public)


def test_empty_log_verifies(tmp_path: Path, site: Identity) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify_log(empty, site.public, expect_head=(0, GENESIS_PREV)) == []


def test_unwritable_path_is_resource_error(tmp_path: Path, site: Identity) -> None:
    with pytest.raises(ResourceError, match="cannot write audit log"):
        append_event(tmp_path / "no-such-dir" / "a.jsonl", site, AuditEvent("export", "ok"))


def test_no_secrets_in_records(log: Path, site: Identity) -> None:
    secret = site.secret_bytes()
    data = log.read_bytes()
    for encoding in (secret.hex(), b64encode(secret), b64encode(secret[:32]), secret[:32].hex()):
        assert encoding.encode() not in data
    assert secret not in data


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"action": "Export"}, "action"),
        ({"action": ""}, "action"),
        ({"outcome": "maybe"}, "outcome"),
        ({"reason": "two\nlines"}, "one line"),
        ({"reason": "escape \x1b[2J"}, "one line"),
        ({"payload_sha256": "ABC"}, "payload_sha256"),
        ({"policy_version": True}, "policy_version"),
        ({"policy_version": -1}, "policy_version"),
        ({"recipients": ("not-a-key-id",)}, "key id"),
        ({"dp": {"epsilon": 3.5}}, "floats are not allowed"),
        ({"details": {1: "x"}}, "keys must be strings"),
        ({"details": ["x"]}, "JSON object"),
    ],
)
def test_invalid_events_are_caller_bugs(kwargs: dict[str, object], pattern: str) -> None:
    fields = {"action": "export", "outcome": "ok", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        AuditEvent(**fields)  # type: ignore[arg-type]


def test_event_is_a_deep_copy() -> None:
    details = {"tensors": ["a"]}
    event = AuditEvent("export", "ok", details=details, recipients=["0" * 32])  # type: ignore[arg-type]
    details["tensors"].append("b")
    assert event.details == {"tensors": ["a"]}
    assert event.recipients == ("0" * 32,)


def test_oversized_record_is_refused(tmp_path: Path, site: Identity) -> None:
    huge = AuditEvent("export", "ok", details={"blob": "x" * audit.MAX_LINE_BYTES})
    with pytest.raises(ValueError, match="limit"):
        append_event(tmp_path / "a.jsonl", site, huge)
    assert not (tmp_path / "a.jsonl").exists() or (tmp_path / "a.jsonl").read_bytes() == b""


# --------------------------------------------------------------------------- tampering


def test_edited_reason_fails_signature(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    assert b'"reason":"disk full"' in lines[1]
    lines[1] = lines[1].replace(b'"reason":"disk full"', b'"reason":"all fine"')
    json.loads(lines[1])  # still valid JSON, still canonical
    write_lines(log, lines)
    expect_bad(log, site, r"line 2 \(seq 1\): signature does not verify")


def test_edited_outcome_fails_signature(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    lines[1] = lines[1].replace(b'"outcome":"refused"', b'"outcome":"ok"')
    write_lines(log, lines)
    expect_bad(log, site, r"line 2 \(seq 1\): signature does not verify")


def test_deleted_middle_record(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    del lines[2]
    write_lines(log, lines)
    expect_bad(log, site, r"line 3 \(seq 3\): seq is 3 where 2 was expected")


def test_deleted_record_with_renumbered_seq_breaks_prev(log: Path, site: Identity) -> None:
    """Even a signer who renumbers the rest cannot fix prev without re-signing everything after."""
    lines = lines_of(log)
    del lines[2]
    lines[2] = resign(site, lines[2], seq=2)
    write_lines(log, lines)
    expect_bad(log, site, r"line 3 \(seq 2\): prev does not match")


def test_inserted_record_by_another_identity(log: Path, site: Identity, outsider: Identity) -> None:
    lines = lines_of(log)
    forged = encode_record(outsider, AuditEvent("export", "ok"), seq=2, prev=sha256_hex(lines[1]), now=NOW)
    lines.insert(2, forged)
    write_lines(log, lines)
    err = expect_bad(log, site, rf"line 3 \(seq 2\): written by key {outsider.key_id} \('outsider'\)")
    assert "not by the expected signer" in err.message


def test_appended_record_by_another_identity(log: Path, site: Identity, outsider: Identity) -> None:
    """Correctly chained and validly signed, but not by the log's writer."""
    forged = encode_record(outsider, AuditEvent("export", "ok"), seq=5, prev=head(log)[1], now=NOW)
    with log.open("ab") as f:
        f.write(forged + b"\n")
    expect_bad(log, site, r"line 6 \(seq 5\): written by key")


def test_inserted_record_claiming_the_signers_key_id(log: Path, site: Identity, outsider: Identity) -> None:
    lines = lines_of(log)
    forged = resign(outsider, lines[2], actor=site.key_id, reason="forged")
    lines[2] = forged
    write_lines(log, lines)
    expect_bad(log, site, r"line 3 \(seq 2\): signature does not verify")


def test_duplicated_record(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    lines.insert(2, lines[1])
    write_lines(log, lines)
    expect_bad(log, site, r"line 3 \(seq 1\): seq is 1 where 2 was expected")


def test_reordered_records(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log, lines)
    expect_bad(log, site, r"line 2 \(seq 2\): seq is 2 where 1 was expected")


@pytest.mark.parametrize("cut", [1, 10, 100])  # all keep the "seq":4 that the message quotes
def test_truncated_last_line_and_append_refuses(log: Path, site: Identity, cut: int) -> None:
    data = log.read_bytes()
    log.write_bytes(data[:-cut])
    expect_bad(log, site, r"line 5 \(seq 4\): incomplete last line")
    with pytest.raises(AuditLogError, match=r"last line \(seq 4\): incomplete last line") as info:
        append_event(log, site, AuditEvent("export", "ok"))
    assert "audit verify" in info.value.hint
    assert log.read_bytes() == data[:-cut]  # nothing appended after the garbage
    with pytest.raises(AuditLogError, match="incomplete"):
        head(log)


def test_truncated_to_a_fragment(log: Path, site: Identity) -> None:
    data = log.read_bytes()
    last_start = data[:-1].rfind(b"\n") + 1
    log.write_bytes(data[: last_start + 5])
    expect_bad(log, site, r"line 5 \(seq unknown\): incomplete last line")


@pytest.mark.parametrize("junk", [b"hello world", b"", b"[1,2,3]", b'{"seq":1}'])
def test_non_json_or_non_record_line(log: Path, site: Identity, junk: bytes) -> None:
    lines = lines_of(log)
    lines[1] = junk
    write_lines(log, lines)
    expect_bad(log, site, r"line 2 \(seq (unknown|1)\): not a valid secure-oneshot-audit/v1 record")
    with pytest.raises(AuditLogError, match=r"line 2 "):
        read_log(log)


def test_wrong_format_tag(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    lines[4] = resign(site, lines[4], format="secure-oneshot-audit/v2")
    write_lines(log, lines)
    expect_bad(log, site, r"line 5 \(seq 4\): .*unknown format 'secure-oneshot-audit/v2'")


def test_non_canonical_line_is_tampering(log: Path, site: Identity) -> None:
    """Same JSON value, valid signature, different bytes: rejected (the hash chain depends on the bytes)."""
    lines = lines_of(log)
    lines[0] = json.dumps(json.loads(lines[0]), sort_keys=True).encode()  # ", " and ": " separators
    write_lines(log, lines)
    expect_bad(log, site, r"line 1 \(seq 0\): .*canonical")


def test_extra_field_is_rejected(log: Path, site: Identity) -> None:
    lines = lines_of(log)
    lines[3] = resign(site, lines[3], note="added")
    write_lines(log, lines)
    expect_bad(log, site, r"line 4 \(seq 3\): .*unknown \['note'\]")


def test_wrong_signer(log: Path, outsider: Identity) -> None:
    with pytest.raises(AuditLogError, match=r"line 1 \(seq 0\): written by key .* wrong --signer"):
        verify_log(log, outsider.public)


def test_append_by_another_identity_is_refused(log: Path, outsider: Identity) -> None:
    before = log.read_bytes()
    with pytest.raises(AuditLogError, match="may not append"):
        append_event(log, outsider, AuditEvent("export", "ok"))
    assert log.read_bytes() == before


def test_tail_deletion_needs_expect_head(log: Path, site: Identity) -> None:
    earlier = head(log)
    for i in range(2):
        append_event(log, site, AuditEvent("ingest", "ok", reason=f"later {i}"))
    later = head(log)
    assert verify_log(log, site.public, expect_head=earlier)  # the log grew: still fine
    assert verify_log(log, site.public, expect_head=later)
    write_lines(log, lines_of(log)[:4])
    # The documented limitation: a log cut at a line boundary is a valid shorter log ...
    assert len(verify_log(log, site.public)) == 4
    # ... which a head written down elsewhere exposes.
    expect_bad(log, site, r"has 4 records but the recorded head says 7: the newest 3 were deleted", expect_head=later)
    expect_bad(log, site, r"has 4 records but the recorded head says 5", expect_head=earlier)


def test_expect_head_detects_a_rewritten_log(tmp_path: Path, site: Identity) -> None:
    """A holder of the writer's key can rewrite the log; the written-down head still catches it."""
    original, rewritten = tmp_path / "o.jsonl", tmp_path / "r.jsonl"
    for path, reason in ((original, "true"), (rewritten, "false")):
        for _ in range(3):
            append_event(path, site, AuditEvent("export", "ok", reason=reason), now=NOW)
    expect_bad(rewritten, site, r"line 3 \(seq 2\) has hash [0-9a-f]{64}, but the recorded head says", expect_head=head(original))


def test_expect_head_argument_is_checked(log: Path, site: Identity) -> None:
    with pytest.raises(ValueError):
        verify_log(log, site.public, expect_head=(5, "nothex"))


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def eight_record_log(tmp_path_factory: pytest.TempPathFactory, site: Identity, outsider: Identity) -> tuple[list[bytes], Path]:
    folder = tmp_path_factory.mktemp("flip")
    path = folder / "audit.jsonl"
    events = five_events(outsider.key_id)
    for i in range(8):
        append_event(path, site, events[i % 5], now=NOW + timedelta(seconds=i))
    return lines_of(path), folder / "flipped.jsonl"


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_single_byte_flip_is_detected(eight_record_log: tuple[list[bytes], Path], site: Identity, data: st.DataObject) -> None:
    """Flip one byte anywhere, including each line's newline; the error names that line.

    No case is skipped: flipping a line's newline merges it with the next line
    (invalid JSON at that line), or, for the final newline, leaves an incomplete
    last line; flipping a byte *to* a newline splits the line (invalid JSON).
    """
    lines, target = eight_record_log
    index = data.draw(st.integers(0, len(lines) - 1), label="line")
    offset = data.draw(st.integers(0, len(lines[index])), label="offset")  # len(...) = the '\n'
    mask = data.draw(st.integers(1, 255), label="xor")
    raw = bytearray(b"".join(line + b"\n" for line in lines))
    raw[sum(len(line) + 1 for line in lines[:index]) + offset] ^= mask
    target.write_bytes(bytes(raw))
    with pytest.raises(AuditLogError, match=rf"line {index + 1} \("):
        verify_log(target, site.public)


printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40)
json_leaf = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | printable
json_values = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(printable, inner, max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(reason=printable, details=st.dictionaries(printable, json_values, max_size=4), version=st.none() | st.integers(0, 2**53 - 1))
def test_events_round_trip(tmp_path_factory: pytest.TempPathFactory, site: Identity, reason: str, details: dict, version: int | None) -> None:
    path = tmp_path_factory.mktemp("rt") / "audit.jsonl"
    event = AuditEvent("export", "refused", reason=reason, policy_id="p", policy_version=version, details=details)
    append_event(path, site, event)
    (record,) = verify_log(path, site.public)
    assert record.event == event
    assert canonical_json(json.loads(record.line)) == record.line


# --------------------------------------------------------------------------- crash safety, tail reading, concurrency


def test_failed_write_leaves_no_partial_line(log: Path, site: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    before = log.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "fsync", no_space)
    with pytest.raises(ResourceError, match="No space left"):
        append_event(log, site, AuditEvent("export", "ok"))
    monkeypatch.undo()
    assert log.read_bytes() == before
    assert append_event(log, site, AuditEvent("export", "ok")).seq == 5


@pytest.mark.parametrize("block", [1, 2, 7, 64, 1 << 16])
def test_last_line_is_read_backwards_in_blocks(tmp_path: Path, block: int) -> None:
    path = tmp_path / "t"
    for content, want in [(b"a\nbb\nccc\n", b"ccc"), (b"only\n", b"only"), (b"\n", b""), (b"x\n\n", b""), (b"", None)]:
        path.write_bytes(content)
        with path.open("rb") as f:
            assert audit._read_last_line(str(path), f.fileno(), block=block) == want, content


def test_head_does_not_read_the_whole_file(log: Path, site: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pad the log with a large (valid) prefix and count the bytes head() reads."""
    for i in range(300):
        append_event(log, site, AuditEvent("export", "ok", details={"pad": "x" * 2000, "i": i}))
    calls: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(audit.os, "pread", lambda fd, n, off: calls.append(n) or real_pread(fd, n, off))
    count, _ = head(log)
    assert count == 305
    assert sum(calls) <= 2 * audit._TAIL_BLOCK < log.stat().st_size


CHILD = r"""
import os, sys, time
from secure_oneshot.audit import AuditEvent, append_event
from secure_oneshot.keys import Identity
log, proc, n, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
secret = bytes.fromhex(sys.stdin.readline().strip())  # a throwaway test key, kept off the command line
identity = Identity("site-a", secret[:32], secret[32:])
open(os.path.join(folder, "ready-" + proc), "w").close()
while not os.path.exists(os.path.join(folder, "go")):  # start together, so the appends overlap
    time.sleep(0.002)
for i in range(n):
    append_event(log, identity, AuditEvent("export", "ok", reason=proc, details={"proc": proc, "i": i}))
"""


def test_concurrent_appends_from_two_processes(tmp_path: Path, site: Identity) -> None:
    path, per_process = tmp_path / "audit.jsonl", 200
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(path), name, str(per_process), str(tmp_path)],
                         stdin=subprocess.PIPE, env=env, text=True)
        for name in ("p1", "p2")
    ]
    for child in children:
        child.stdin.write(site.secret_bytes().hex() + "\n")  # type: ignore[union-attr]
        child.stdin.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready-{n}").exists() for n in ("p1", "p2")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [child.wait(timeout=60) for child in children] == [0, 0]

    records = verify_log(path, site.public)
    assert [r.seq for r in records] == list(range(2 * per_process))
    for name in ("p1", "p2"):
        mine = [r.event.details["i"] for r in records if r.event.details["proc"] == name]
        assert mine == list(range(per_process))  # all present, in each process's own order


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true")
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser(prog="secure-oneshot", parents=[common])
    register(parser.add_subparsers(dest="command", required=True), common)
    return parser


def cli(*argv: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    args = build_parser().parse_args([os.fspath(a) for a in argv])
    return args.handler(args)


@pytest.fixture()
def signer_file(tmp_path: Path, site: Identity) -> Path:
    path = tmp_path / "site-a.pub"
    path.write_text(site.public.to_text())
    return path


def test_cli_verify_ok(log: Path, signer_file: Path) -> None:
    result = cli("audit", "verify", log, "--signer", signer_file)
    count, last = head(log)
    assert result.lines[0] == f"OK: 5 records, chain intact, last hash {last}"
    assert result.data["records"] == count == 5
    assert result.data["last_hash"] == last
    assert result.data["expect_head_checked"] is False


def test_cli_verify_expect_head(log: Path, signer_file: Path) -> None:
    count, last = head(log)
    result = cli("audit", "verify", log, "--signer", signer_file, "--expect-count", str(count), "--expect-hash", last.upper())
    assert result.data["expect_head_checked"] is True
    write_lines(log, lines_of(log)[:-1])
    with pytest.raises(AuditLogError, match="has 4 records but the recorded head says 5") as info:
        cli("audit", "verify", log, "--signer", signer_file, "--expect-count", str(count), "--expect-hash", last)
    assert info.value.exit_code == 14


def test_cli_verify_tampered(log: Path, signer_file: Path) -> None:
    lines = lines_of(log)
    lines[1], lines[2] = lines[2], lines[1]
    write_lines(log, lines)
    with pytest.raises(AuditLogError, match=r"line 2 \(seq 2\)") as info:
        cli("audit", "verify", log, "--signer", signer_file)
    assert info.value.exit_code == AuditLogError.exit_code == 14


@pytest.mark.parametrize(
    "extra", [["--expect-count", "5"], ["--expect-hash", "a" * 64], ["--expect-count", "x", "--expect-hash", "a" * 64],
              ["--expect-count", "5", "--expect-hash", "xyz"]],
)
def test_cli_verify_usage_errors(log: Path, signer_file: Path, extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli("audit", "verify", log, "--signer", signer_file, *extra)
    assert info.value.code == 2
    assert "--expect" in capsys.readouterr().err


def test_cli_show_table(log: Path) -> None:
    result = cli("audit", "show", log)
    header, *rows, footer = result.lines
    assert re.split(r"\s+", header) == ["seq", "time", "actor", "action", "outcome", "bundle", "policy", "reason"]
    assert len(rows) == 5
    assert re.split(r"\s{2,}", rows[1]) == ["1", "2026-11-26T12:01:00Z", "site-a", "export", "refused", "-", "pneumonia-export@3", "disk full"]
    assert "01234567" in rows[2] and "pneumonia-export@0" in rows[2]
    assert "NOT verified" in footer
    assert [r["seq"] for r in result.data["records"]] == [0, 1, 2, 3, 4]


def test_cli_show_last_and_json(log: Path) -> None:
    result = cli("--json", "audit", "show", log, "--last", "2")
    records = result.data["records"]
    assert [r["seq"] for r in records] == [3, 4]
    assert records[-1]["hash"] == head(log)[1]
    assert set(records[0]) == RECORD_FIELDS | {"hash"}
    assert result.data["total"] == 5
    json.dumps(result.data)  # JSON-able as main() prints it


def test_cli_head(log: Path) -> None:
    result = cli("audit", "head", log)
    count, last = head(log)
    assert result.data == {"log": str(log), "count": count, "last_hash": last, "verified": False}
    assert f"--expect-count {count} --expect-hash {last}" in "\n".join(result.lines)


@pytest.mark.parametrize("action", ["show", "head"])
def test_cli_missing_log(tmp_path: Path, action: str) -> None:
    with pytest.raises(ResourceError, match="no audit log"):
        cli("audit", action, tmp_path / "missing.jsonl")


@pytest.fixture()
def main_with_audit(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``secure_oneshot.cli.main`` with ``audit`` registered (until cli/__init__.py does it itself)."""
    import secure_oneshot.cli as cli_package

    original = cli_package.build_parser

    def build_with_audit(*args: object) -> argparse.ArgumentParser:
        parser = original(*args)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "audit" not in commands.choices:
            register(commands, cli_package._common_options(argparse.SUPPRESS))
        return parser

    monkeypatch.setattr(cli_package, "build_parser", build_with_audit)
    return cli_package.main


def test_cli_main_tampered_log_exit_code(main_with_audit, log: Path, signer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main_with_audit(["audit", "verify", str(log), "--signer", str(signer_file)]) == 0
    assert capsys.readouterr().out.startswith("OK: 5 records, chain intact, last hash ")
    lines = lines_of(log)
    del lines[1]
    write_lines(log, lines)
    assert main_with_audit(["--json", "audit", "verify", str(log), "--signer", str(signer_file)]) == 14
    out, err = capsys.readouterr()
    assert err.startswith("secure-oneshot: error: audit log ") and "line 2 (seq 2)" in err
    assert "Traceback" not in err
    assert json.loads(out)["error"]["type"] == "AuditLogError"

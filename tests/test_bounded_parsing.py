"""Hostile sizes, depths and dimensions: every parser of outside bytes is bounded before it allocates.

Written as an attacker would: craft the smallest file that makes a naive reader
allocate, recurse or loop, and assert the specific error class (and that no
buffer was allocated from the claimed size).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from datetime import timedelta
from pathlib import Path

import pytest

import secure_oneshot.bundle.verify as verify_module
from secure_oneshot import audit
from secure_oneshot._internal.encoding import canonical_json, parse_strict_json
from secure_oneshot.bundle import VerifyOptions, inspect_bundle, open_bundle, parse_payload
from secure_oneshot.bundle.format import (
    MAX_PAYLOAD_SIZE,
    MAX_TRAILER_LEN,
    Header,
    Manifest,
    check_stream_length,
    ciphertext_length,
    header_mac,
)
from secure_oneshot.bundle.recipients import wrap_file_key
from secure_oneshot.bundle.verify import DEFAULT_MAX_PAYLOAD_BYTES
from secure_oneshot.cli import main
from secure_oneshot.errors import (
    AuditLogError,
    BundleAuthError,
    BundleFormatError,
    PrivacyError,
    TensorPayloadError,
)
from secure_oneshot.policy import dp

from .conftest import NOW, SMALL_CHUNK

VECTORS = Path(__file__).parent / "vectors"
DEEP = 100_000


@pytest.fixture()
def no_payload_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if open_bundle allocates the payload buffer at all."""
    def refuse(size: int) -> memoryview:
        raise AssertionError(f"allocated {size} bytes from an unchecked size")
    monkeypatch.setattr(verify_module, "_payload_buffer", refuse)


def forged_bundle(parties, path: Path, *, payload_size: int, stream: bytes, chunk_size: int = SMALL_CHUNK) -> Path:
    """What anyone can write: a header naming the trusted site as sender, a valid stanza and MAC
    for the server (the attacker picks the file key), and whatever stream bytes they like."""
    file_key = os.urandom(32)
    header = Header("ab" * 16, parties.site.key_id, (wrap_file_key(file_key, parties.server.public),),
                    "2026-11-26T12:00:00Z", "2026-12-03T12:00:00Z", "", payload_size, chunk_size)
    header_bytes = header.to_bytes()
    path.write_bytes(header_bytes + header_mac(file_key, header_bytes) + stream)
    return path


# --- sizes the header states ---------------------------------------------------------------------


def test_huge_claim_in_small_file_is_refused_before_allocation(parties, tmp_path: Path, no_payload_allocation) -> None:
    bundle = forged_bundle(parties, tmp_path / "claim.sob", payload_size=60 << 30, stream=b"\x00" * 1000)
    with pytest.raises(BundleFormatError, match="exceeds the limit"):  # default reader limit comes first
        open_bundle(bundle, parties.server, parties.trust, now=NOW)
    with pytest.raises(BundleAuthError, match="too short") as caught:  # no limit: the file's length refuses it
        open_bundle(bundle, parties.server, parties.trust, now=NOW, options=VerifyOptions(max_payload_bytes=None))
    assert caught.value.exit_code == 6
    with pytest.raises(BundleAuthError, match="too short"):
        inspect_bundle(bundle)


def test_payload_size_over_the_format_maximum_is_a_format_error(parties, tmp_path: Path) -> None:
    for size in (MAX_PAYLOAD_SIZE + 1, 2**53 - 1):
        bundle = forged_bundle(parties, tmp_path / "big.sob", payload_size=size, stream=b"")
        with pytest.raises(BundleFormatError, match="payload_size out of range") as caught:
            inspect_bundle(bundle)
        assert caught.value.exit_code == 5


@pytest.mark.parametrize("chunk_size", [1 << 40, 1 << 25, 1 << 15, (1 << 20) + 1, 0, -1])
def test_chunk_size_outside_the_format_is_refused(parties, tmp_path: Path, chunk_size: int) -> None:
    bundle = forged_bundle(parties, tmp_path / "chunk.sob", payload_size=10, stream=b"\x00" * 200, chunk_size=chunk_size)
    with pytest.raises(BundleFormatError, match="chunk_size"):
        inspect_bundle(bundle)


def test_sparse_8_tib_file_is_refused_without_reading(parties, sealed: Path, tmp_path: Path, no_payload_allocation) -> None:
    sparse = tmp_path / "sparse.sob"
    shutil.copy(sealed, sparse)
    try:
        os.truncate(sparse, 8 << 40)  # 8 TiB, no blocks on disk
    except OSError as e:
        pytest.skip(f"this filesystem cannot hold an 8 TiB sparse file: {e}")
    with pytest.raises(BundleFormatError, match="longer than") as caught:
        open_bundle(sparse, parties.server, parties.trust, now=NOW, options=VerifyOptions(max_payload_bytes=None))
    assert caught.value.exit_code == 5
    with pytest.raises(BundleFormatError, match="longer than"):
        inspect_bundle(sparse)


def test_stream_longer_than_any_trailer_is_a_format_error(parties, sealed: Path, tmp_path: Path, no_payload_allocation) -> None:
    padded = tmp_path / "padded.sob"
    padded.write_bytes(sealed.read_bytes() + b"\x00" * (MAX_TRAILER_LEN + 2 * SMALL_CHUNK))
    with pytest.raises(BundleFormatError, match="longer than"):
        open_bundle(padded, parties.server, parties.trust, now=NOW)


def test_stream_length_bounds_are_exact() -> None:
    header = Header("ab" * 16, "cd" * 16, (), "2026-11-26T12:00:00Z", "2026-12-03T12:00:00Z", "", 1000, SMALL_CHUNK)
    shortest = ciphertext_length(1000 + 4 + 1 + 64, SMALL_CHUNK)
    longest = ciphertext_length(1000 + MAX_TRAILER_LEN, SMALL_CHUNK)
    check_stream_length(header, shortest)
    check_stream_length(header, longest)
    with pytest.raises(BundleAuthError):
        check_stream_length(header, shortest - 1)
    with pytest.raises(BundleFormatError):
        check_stream_length(header, longest + 1)


def test_verify_options_default_to_a_payload_limit() -> None:
    assert VerifyOptions().max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 2 << 30


def test_non_regular_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.sob"
    os.mkfifo(fifo)
    with pytest.raises(BundleFormatError, match="not a regular file"):
        inspect_bundle(fifo)  # a blocking open() would hang here
    with pytest.raises(BundleFormatError, match="directory"):
        inspect_bundle(tmp_path)


# --- the CLI gets the same limits -----------------------------------------------------------------


@pytest.fixture()
def vector_key(tmp_path: Path) -> Path:
    key = tmp_path / "server.key"
    shutil.copy(VECTORS / "keys" / "server.key", key)
    key.chmod(0o600)
    return key


@pytest.mark.parametrize("command", ["verify", "open"])
def test_cli_max_bytes_refuses_before_reading(command: str, vector_key: Path, tmp_path: Path, capsys) -> None:
    argv = [command, str(VECTORS / "ok_one_recipient.sob"), "--key", str(vector_key),
            "--trust", str(VECTORS / "keys" / "trust.toml"), "--max-bytes", "100"]
    if command == "open":
        argv += ["--out", str(tmp_path / "out.safetensors")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test-only key is unprotected on purpose
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 5 and "exceeds the limit of 100" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value", ["0", "-5", "ten", str(MAX_PAYLOAD_SIZE + 1)])
def test_cli_max_bytes_is_validated(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["verify", "b.sob", "--key", "k.key", "--max-bytes", value])
    assert caught.value.code == 2


# --- JSON nesting --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [b"[" * DEEP, b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP,
                                  b'[{"a":' * (DEEP // 2)])
def test_deep_json_is_a_value_error_not_a_recursion_error(text: bytes) -> None:
    with pytest.raises(ValueError, match="JSON nested deeper than 32 levels"):
        parse_strict_json(text, canonical=False)


def test_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    assert parse_strict_json(b"[" * 32 + b"]" * 32, canonical=True) is not None
    with pytest.raises(ValueError, match="deeper than 32"):
        parse_strict_json(b"[" * 33 + b"]" * 33, canonical=True)
    tricky = canonical_json({"a": "[[[[" * 100 + '\\"{{{{' * 100})
    assert parse_strict_json(tricky, canonical=True)["a"].startswith("[[[[")
    assert parse_strict_json(b"[[1]]", canonical=False, max_depth=2) == [[1]]
    with pytest.raises(ValueError, match="deeper than 1 levels"):
        parse_strict_json(b"[[1]]", canonical=False, max_depth=1)


def test_size_cap() -> None:
    with pytest.raises(ValueError, match="exceeds the 10-byte limit"):
        parse_strict_json(b'"' + b"x" * 20 + b'"', canonical=False, max_bytes=10)


def _header_with(parties, edit) -> bytes:
    header = Header("ab" * 16, parties.site.key_id, (wrap_file_key(bytes(32), parties.server.public),),
                    "2026-11-26T12:00:00Z", "2026-12-03T12:00:00Z", "", 10, SMALL_CHUNK).to_json()
    edit(header)
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("depth", [40, 5000, DEEP])
def test_deep_bundle_header_is_a_format_error(parties, tmp_path: Path, depth: int) -> None:
    body = _header_with(parties, lambda h: h.__setitem__("policy_id", "@"))
    body = body.replace(b'"@"', b"[" * depth + b"]" * depth)
    if len(body) > 65536:  # the header length field caps it first; that is a format error too
        body = body[:65536]
    path = tmp_path / "deep.sob"
    path.write_bytes(b"secure-oneshot/v1\n" + len(body).to_bytes(4, "big") + body + bytes(32) + bytes(200))
    with pytest.raises(BundleFormatError):
        inspect_bundle(path)


def test_deep_manifest_is_a_format_error() -> None:
    manifest = Manifest("ab" * 16, "cd" * 16, ("ef" * 16,), "2026-11-26T12:00:00Z", "2026-12-03T12:00:00Z", "", 0, "0" * 64)
    body = manifest.to_bytes().replace(b'"meta":{}', b'"meta":{"x":' + b"[" * DEEP + b"]" * DEEP + b"}")
    with pytest.raises(BundleFormatError, match="nested deeper than 32"):
        Manifest.from_bytes(body)


def test_deep_audit_line_is_an_audit_log_error(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    log.write_bytes(b"[" * DEEP + b"\n")
    with pytest.raises(AuditLogError, match="nested deeper"):
        audit.read_log(log)
    log.write_bytes(b'{"seq":7,"details":' + b"[" * 5000 + b"]" * 5000 + b"}\n")
    with pytest.raises(AuditLogError, match=r"seq 7"):
        audit.read_log(log)


def test_audit_event_deeper_than_a_reader_accepts_is_refused_on_write() -> None:
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(ValueError, match="deeper"):
        audit.AuditEvent("export", "ok", details={"x": nested})


# --- safetensors headers and shapes ---------------------------------------------------------------


def raw_safetensors(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def one_tensor(shape: object, offsets: object = (0, 8), dtype: object = "F32") -> bytes:
    entry = {"dtype": dtype, "shape": shape, "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}
    return raw_safetensors(json.dumps({"t": entry}).encode(), b"\x00" * 8)


@pytest.mark.parametrize("shape, offsets", [
    ([0, 2**64], (0, 0)),            # a dimension beyond int64, with zero bytes
    ([2**64, 2**64], (0, 8)),        # product overflows int64
    ([-1, -2], (0, 8)),              # negative dims whose product matches
    ([-2], (0, 8)),
    ([1] * 9, (0, 4)),               # too many dimensions
    ([2**41], (0, 8)),               # one dimension too large
    ([2**40] * 8, (0, 8)),           # in range per dim, product does not match the data
    ([True, 2], (0, 8)),             # bools are not dimensions
    ([2.0], (0, 8)),
    (["2"], (0, 8)),
    ([None], (0, 8)),
    ("2", (0, 8)),                   # not a list
    ({"0": 2}, (0, 8)),
    (2, (0, 8)),
    ([2], (0, 2**70)),               # offsets out of any range
    ([2], (True, 8)),
    ([2], [0]),
    ([2], "0,8"),
])
def test_bad_shapes_and_offsets_are_payload_errors(shape: object, offsets: object) -> None:
    with pytest.raises(TensorPayloadError) as caught:
        parse_payload(bytearray(one_tensor(shape, offsets)))
    assert caught.value.exit_code == 13


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 4, None, True])
def test_non_string_dtype_is_a_payload_error(dtype: object) -> None:
    with pytest.raises(TensorPayloadError, match="dtype"):
        parse_payload(bytearray(one_tensor([2], dtype=dtype)))


def test_deep_safetensors_header_is_a_payload_error() -> None:
    with pytest.raises(TensorPayloadError, match="nested deeper than 32"):
        parse_payload(bytearray(raw_safetensors(b'{"t":' + b"[" * DEEP + b"]" * DEEP + b"}")))


def test_safetensors_header_length_over_the_cap_is_refused_before_reading() -> None:
    with pytest.raises(TensorPayloadError, match="exceeds"):
        parse_payload(bytearray(struct.pack("<Q", 2**63) + b"{}"))


# --- DP records: bounded accountant work ----------------------------------------------------------


def _record_json(entries: int) -> dict:
    return {"history": [{"noise_multiplier": "1.0", "sample_rate": "0.01", "steps": 1}] * entries}


def test_bundle_history_cap() -> None:
    assert dp.check_bundle_history({"a": _record_json(1000), "b": _record_json(1000)}) == 2000
    many = {f"artifact{i}": _record_json(1000) for i in range(11)}
    with pytest.raises(PrivacyError, match="11000 history entries") as caught:
        dp.check_bundle_history(many)
    assert caught.value.exit_code == 8
    with pytest.raises(PrivacyError):
        dp.check_bundle_history([])  # type: ignore[arg-type]
    assert dp.check_bundle_history({"odd": "not a record"}) == 0  # left to DpRecord.from_json to refuse


def test_record_history_cap_per_record() -> None:
    assert dp.MAX_HISTORY_ENTRIES <= 1024
    with pytest.raises(PrivacyError, match="entries"):
        dp.DpRecord.from_json({**dp.DpRecord("rdp", ((1.0, 0.01, 1),), 1e-5, 1.0, 1.0, "poisson", "x", {}).to_json(),
                               **_record_json(dp.MAX_HISTORY_ENTRIES + 1)}, "dp.x")


@pytest.mark.parametrize("history, match", [
    ([(1.0, 1e-12, 10)], "sample_rate"),                          # 4.5 s per entry in Opacus's RDP series
    ([(1.0, 0.01, 10**9 + 1)], "steps"),
    ([(1.0 + i / 100, 0.01, 10) for i in range(dp.MAX_DISTINCT_ENTRIES + 1)], "distinct"),
])
def test_recomputation_refuses_expensive_histories(history: list, match: str) -> None:
    for accountant in dp.ACCOUNTANTS:
        with pytest.raises(PrivacyError, match=match):
            dp.compute_epsilon(accountant, history, 1e-5)


def test_equal_entries_merge_so_repetition_costs_nothing() -> None:
    repeated = [(1.1, 0.01, 1)] * dp.MAX_HISTORY_ENTRIES
    merged = dp.compute_epsilon("rdp", [(1.1, 0.01, dp.MAX_HISTORY_ENTRIES)], 1e-5)
    assert dp.compute_epsilon("rdp", repeated, 1e-5) == pytest.approx(merged, rel=1e-12)


def test_expired_forged_bundle_still_allocates_nothing(parties, tmp_path: Path, no_payload_allocation) -> None:
    """Order check: the size/length checks run before freshness, trust and the MAC."""
    bundle = forged_bundle(parties, tmp_path / "old.sob", payload_size=1 << 30, stream=b"\x00" * 64)
    with pytest.raises(BundleAuthError, match="too short"):
        open_bundle(bundle, parties.server, parties.trust, now=NOW + timedelta(days=30))

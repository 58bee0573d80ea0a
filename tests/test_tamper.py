"""Tamper suite: every modification of a sealed bundle is refused with a specific error.

Each test asserts the error class *and* its exit code, as the CLI would report it.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_oneshot.bundle import ReplayLedger, inspect_bundle, open_bundle
from secure_oneshot.bundle.format import MAC_SIZE, TAG_SIZE, Header
from secure_oneshot.bundle.recipients import unwrap_file_key, wrap_file_key
from secure_oneshot.bundle.seal import write_stream
from secure_oneshot.errors import (
    BundleAuthError,
    BundleFormatError,
    FreshnessError,
    NotARecipientError,
    ReplayError,
    SecureOneshotError,
    TrustError,
)
from secure_oneshot.keys import TrustEntry

from .conftest import NOW, SMALL_CHUNK, seal_sample

SEALED_CACHE: dict[str, bytes] = {}


def layout(data: bytes) -> tuple[int, int]:
    """(end of header, start of stream) for a bundle's bytes."""
    header_end = 18 + 4 + int.from_bytes(data[18:22], "big")
    return header_end, header_end + MAC_SIZE


def chunk_starts(data: bytes) -> list[int]:
    _, stream = layout(data)
    step = SMALL_CHUNK + TAG_SIZE
    return list(range(stream, len(data), step))


def expect(error: type[SecureOneshotError], code: int, path: Path, parties, match: str | None = None, **kwargs) -> None:
    assert error.exit_code == code
    with pytest.raises(error, match=match) as caught:
        open_bundle(path, kwargs.pop("identity", parties.server), kwargs.pop("trust", parties.trust), now=kwargs.pop("now", NOW), **kwargs)
    assert type(caught.value) is error, f"expected exactly {error.__name__}, got {type(caught.value).__name__}"


def write(tmp_path: Path, data: bytes, name: str = "t.sob") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture()
def original(sealed: Path) -> bytes:
    data = sealed.read_bytes()
    assert len(chunk_starts(data)) >= 3, "the fixture must span several chunks"
    return data


# --- bit flips -----------------------------------------------------------------------------

HEADER_ERRORS = (BundleFormatError, BundleAuthError, TrustError, NotARecipientError, FreshnessError)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_is_refused(parties, original: bytes, tmp_path: Path, fraction: float, bit: int) -> None:
    position = int(fraction * len(original))
    mutated = bytearray(original)
    mutated[position] ^= 1 << bit
    header_end, stream_start = layout(original)
    path = write(tmp_path, bytes(mutated))
    with pytest.raises(SecureOneshotError) as caught:
        open_bundle(path, parties.server, parties.trust, now=NOW)
    if position >= header_end:  # MAC or stream: always an authentication failure
        assert type(caught.value) is BundleAuthError
    else:  # header bytes may fail parsing, trust, recipient lookup or freshness first
        assert isinstance(caught.value, HEADER_ERRORS)


@pytest.mark.parametrize("region", ["magic", "mac", "first_chunk", "last_chunk", "last_tag"])
def test_bit_flip_in_named_regions(parties, original: bytes, tmp_path: Path, region: str) -> None:
    header_end, stream = layout(original)
    position = {"magic": 3, "mac": header_end + 5, "first_chunk": stream + 100, "last_chunk": chunk_starts(original)[-1] + 1, "last_tag": len(original) - 1}[region]
    mutated = bytearray(original)
    mutated[position] ^= 0x10
    error = BundleFormatError if region == "magic" else BundleAuthError
    expect(error, error.exit_code, write(tmp_path, bytes(mutated)), parties)


# --- truncation, reordering, duplication, appending -----------------------------------------


def test_truncation_at_every_chunk_boundary_and_mid_chunk(parties, original: bytes, tmp_path: Path) -> None:
    _, stream = layout(original)
    cuts = chunk_starts(original)[1:] + [c + 77 for c in chunk_starts(original)] + [len(original) - 1, len(original) - TAG_SIZE, stream]
    for cut in sorted(set(cuts)):
        expect(BundleAuthError, 6, write(tmp_path, original[:cut]), parties, match="truncated or modified")


def test_truncation_inside_header_is_a_format_error(parties, original: bytes, tmp_path: Path) -> None:
    header_end, _ = layout(original)
    for cut in (0, 10, 20, header_end - 1, header_end + 5):
        expect(BundleFormatError, 5, write(tmp_path, original[:cut]), parties)


def _chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    starts = chunk_starts(data)
    ends = starts[1:] + [len(data)]
    return data[: starts[0]], [data[s:e] for s, e in zip(starts, ends)]


def test_chunk_reorder(parties, original: bytes, tmp_path: Path) -> None:
    prefix, chunks = _chunks(original)
    swapped = [chunks[1], chunks[0], *chunks[2:]]
    expect(BundleAuthError, 6, write(tmp_path, prefix + b"".join(swapped)), parties)


def test_chunk_duplication(parties, original: bytes, tmp_path: Path) -> None:
    prefix, chunks = _chunks(original)
    expect(BundleAuthError, 6, write(tmp_path, prefix + b"".join([chunks[0], *chunks])), parties)


def test_chunk_dropped(parties, original: bytes, tmp_path: Path) -> None:
    prefix, chunks = _chunks(original)
    expect(BundleAuthError, 6, write(tmp_path, prefix + b"".join([chunks[0], *chunks[2:]])), parties)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * TAG_SIZE, b"y" * (SMALL_CHUNK + TAG_SIZE)])
def test_appended_bytes(parties, original: bytes, tmp_path: Path, extra: bytes) -> None:
    expect(BundleAuthError, 6, write(tmp_path, original + extra), parties)


# --- header edits ---------------------------------------------------------------------------


def _edit_header(data: bytes, edit) -> bytes:
    """Re-encode the header after ``edit(dict)``, keeping MAC and stream (as an attacker would)."""
    header_end, _ = layout(data)
    obj = json.loads(data[22:header_end])
    edit(obj)
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return data[:18] + len(body).to_bytes(4, "big") + body + data[header_end:]


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("bundle_id", "0" * 32, BundleAuthError),
        ("policy_id", "other-policy", BundleAuthError),
        ("payload_size", 1, BundleAuthError),
        ("expires", "2026-12-30T12:00:00Z", BundleAuthError),
        ("created", "2026-11-25T12:00:00Z", BundleAuthError),
        ("chunk_size", 1 << 17, BundleAuthError),
        ("format", "secure-oneshot/v2", BundleFormatError),
        ("payload_size", -1, BundleFormatError),
        ("payload_size", 1.5, BundleFormatError),
        ("created", "2026-11-26 12:00:00", BundleFormatError),
        ("recipients", [], BundleFormatError),
        ("chunk_size", 1000, BundleFormatError),
    ],
)
def test_header_field_edits(parties, original: bytes, tmp_path: Path, field: str, value, error) -> None:
    mutated = _edit_header(original, lambda h: h.__setitem__(field, value))
    expect(error, error.exit_code, write(tmp_path, mutated), parties)


def test_unknown_and_missing_header_fields(parties, original: bytes, tmp_path: Path) -> None:
    expect(BundleFormatError, 5, write(tmp_path, _edit_header(original, lambda h: h.__setitem__("extra", 1))), parties, match="unknown fields")
    expect(BundleFormatError, 5, write(tmp_path, _edit_header(original, lambda h: h.pop("policy_id"))), parties, match="missing fields")


def test_non_canonical_header_is_rejected(parties, original: bytes, tmp_path: Path) -> None:
    header_end, _ = layout(original)
    body = json.dumps(json.loads(original[22:header_end]), indent=1).encode()
    mutated = original[:18] + len(body).to_bytes(4, "big") + body + original[header_end:]
    expect(BundleFormatError, 5, write(tmp_path, mutated), parties, match="canonical")


def test_duplicate_header_key_is_rejected(parties, original: bytes, tmp_path: Path) -> None:
    header_end, _ = layout(original)
    body = original[22:header_end][:-1] + b',"policy_id":""}'
    mutated = original[:18] + len(body).to_bytes(4, "big") + body + original[header_end:]
    expect(BundleFormatError, 5, write(tmp_path, mutated), parties, match="duplicate")


def test_sender_swapped_to_another_trusted_sender(parties, original: bytes, tmp_path: Path) -> None:
    """Claiming another (trusted) sender breaks the MAC before the signature is even reached."""
    trust = parties.trust.with_entry(TrustEntry(parties.escrow.public, frozenset({"sender"})))
    mutated = _edit_header(original, lambda h: h.__setitem__("sender", parties.escrow.key_id))
    expect(BundleAuthError, 6, write(tmp_path, mutated), parties, trust=trust)


def test_stanza_swapped_from_another_bundle(parties, original: bytes, tmp_path: Path) -> None:
    other = seal_sample(parties, tmp_path / "other.sob").path.read_bytes()
    other_header_end, _ = layout(other)
    theirs = json.loads(other[22:other_header_end])["recipients"]
    mutated = _edit_header(original, lambda h: h.__setitem__("recipients", theirs))
    expect(BundleAuthError, 6, write(tmp_path, mutated), parties, match="header MAC")


def test_corrupted_stanza(parties, original: bytes, tmp_path: Path) -> None:
    def corrupt(h):
        h["recipients"][0]["wrapped_key"] = "A" * 64

    expect(BundleAuthError, 6, write(tmp_path, _edit_header(original, corrupt)), parties, match="stanza")


# --- keys and trust -------------------------------------------------------------------------


def test_wrong_recipient_key(parties, sealed: Path) -> None:
    expect(NotARecipientError, 4, sealed, parties, identity=parties.outsider)


def test_untrusted_sender(parties, sealed: Path) -> None:
    expect(TrustError, 10, sealed, parties, trust=type(parties.trust)(), match="not in the trust store")


def test_sender_trusted_only_as_recipient(parties, sealed: Path) -> None:
    trust = type(parties.trust)().with_entry(TrustEntry(parties.site.public, frozenset({"recipient"})))
    expect(TrustError, 10, sealed, parties, trust=trust, match="not as sender")


def test_revoked_sender(parties, sealed: Path) -> None:
    trust = parties.trust.with_revocation(parties.site.key_id, "laptop stolen", NOW)
    expect(TrustError, 10, sealed, parties, trust=trust, match="revoked")


def test_expired_trust_entry(parties, sealed: Path) -> None:
    trust = type(parties.trust)().with_entry(TrustEntry(parties.site.public, frozenset({"sender"}), expires=NOW - timedelta(days=1)))
    expect(TrustError, 10, sealed, parties, trust=trust, match="expired")


# --- time and replay ------------------------------------------------------------------------


def test_expired_bundle(parties, sealed: Path) -> None:
    expect(FreshnessError, 12, sealed, parties, now=NOW + timedelta(days=7), match="expired")


def test_future_dated_bundle_beyond_skew(parties, sealed: Path) -> None:
    expect(FreshnessError, 12, sealed, parties, now=NOW - timedelta(minutes=6), match="future")


def test_future_dated_within_skew_is_accepted(parties, sealed: Path) -> None:
    open_bundle(sealed, parties.server, parties.trust, now=NOW - timedelta(minutes=4))


def test_replay_is_refused(parties, sealed: Path, tmp_path: Path) -> None:
    ledger = ReplayLedger(tmp_path / "ledger.db")
    open_bundle(sealed, parties.server, parties.trust, now=NOW, ledger=ledger)
    expect(ReplayError, 11, sealed, parties, ledger=ledger)
    # The ledger persists across processes (a fresh connection sees the record).
    expect(ReplayError, 11, sealed, parties, ledger=ReplayLedger(tmp_path / "ledger.db"))


def test_failed_open_does_not_consume_the_bundle_id(parties, original: bytes, tmp_path: Path) -> None:
    ledger = ReplayLedger(tmp_path / "ledger.db")
    bad = bytearray(original)
    bad[-1] ^= 1
    expect(BundleAuthError, 6, write(tmp_path, bytes(bad), "bad.sob"), parties, ledger=ledger)
    open_bundle(write(tmp_path, original, "good.sob"), parties.server, parties.trust, now=NOW, ledger=ledger)


# --- surreptitious forwarding ---------------------------------------------------------------


def _forward(parties, sealed: Path, out: Path, keep_recipient_list: bool) -> Path:
    """The server (a legitimate recipient) re-encrypts the site's signed payload to the outsider."""
    opened = open_bundle(sealed, parties.server, parties.trust, now=NOW)
    body = opened.manifest.to_bytes()
    signature = _signature_from(parties, sealed)
    file_key = bytes(32)
    stanza = wrap_file_key(file_key, parties.outsider.public)
    header = opened.header
    new_header = Header(header.bundle_id, header.sender, (stanza,), header.created, header.expires, header.policy_id, header.payload_size, header.chunk_size)
    if keep_recipient_list:  # claim the server as recipient but wrap the key for the outsider
        new_header = Header(header.bundle_id, header.sender, (type(stanza)(parties.server.key_id, stanza.epk, stanza.wrapped_key),), header.created, header.expires, header.policy_id, header.payload_size, header.chunk_size)
    trailer = len(body).to_bytes(4, "big") + body + signature
    with open(out, "wb") as f:
        write_stream(f, new_header.to_bytes(), file_key, header.chunk_size, [memoryview(opened.payload_bytes)], lambda digest: trailer)
    return out


def _signature_from(parties, sealed: Path) -> bytes:
    """Recover the site's signature by decrypting the stream as the server can."""
    from secure_oneshot.bundle.format import stream_key
    from secure_oneshot.bundle.inspect import read_header
    from secure_oneshot.bundle.stream import decrypt_stream

    with open(sealed, "rb") as f:
        raw = read_header(f)
        file_key = unwrap_file_key(raw.header, parties.server)
        payload = bytearray(raw.header.payload_size)
        trailer = decrypt_stream(f, sealed.stat().st_size - raw.stream_offset, stream_key(file_key, raw.header_bytes), raw.header.chunk_size, memoryview(payload))
    return bytes(trailer[-64:])


def test_surreptitious_forwarding_is_refused(parties, sealed: Path, tmp_path: Path) -> None:
    forwarded = _forward(parties, sealed, tmp_path / "fwd.sob", keep_recipient_list=False)
    assert inspect_bundle(forwarded).recipient_ids == (parties.outsider.key_id,)
    expect(BundleAuthError, 6, forwarded, parties, identity=parties.outsider, match="forwarded")


def test_forwarding_with_a_relabelled_stanza_is_refused(parties, sealed: Path, tmp_path: Path) -> None:
    forwarded = _forward(parties, sealed, tmp_path / "fwd.sob", keep_recipient_list=True)
    # The outsider is not named at all, so it cannot even find its stanza.
    expect(NotARecipientError, 4, forwarded, parties, identity=parties.outsider)

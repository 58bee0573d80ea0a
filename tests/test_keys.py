"""Identities, private key files and the trust store."""

from __future__ import annotations

import base64
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from secure_oneshot.errors import ConfigError, KeyMaterialError, PassphraseError, TrustError
from secure_oneshot.keys import (
    FAST_INSECURE_KDF,
    Identity,
    PublicIdentity,
    TrustEntry,
    TrustStore,
    UnsafePlaintextKeyWarning,
    compute_key_id,
    format_key_id,
    identity_from_text,
    is_protected,
    load_identity,
    load_public,
    load_trust_store,
    save_identity,
    save_trust_store,
)
from secure_oneshot.keys.trust import trust_store_from_text

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Identity, Path, Path]:
    identity = Identity.generate("st-marys")
    private, public = save_identity(identity, tmp_path, PASSPHRASE, kdf=FAST_INSECURE_KDF)
    return identity, private, public


def test_private_key_file_mode_and_round_trip(saved) -> None:
    identity, private, public = saved
    assert private.stat().st_mode & 0o777 == 0o600
    assert is_protected(private)
    assert load_identity(private, PASSPHRASE).secret_bytes() == identity.secret_bytes()
    assert load_public(public) == identity.public == load_public(private)


def test_wrong_passphrase_is_a_clear_error_without_secrets(saved) -> None:
    identity, private, _ = saved
    with pytest.raises(PassphraseError, match="wrong passphrase") as caught:
        load_identity(private, b"not it")
    text = f"{caught.value.message} {caught.value.hint} {caught.value!r}"
    for secret in (PASSPHRASE, b"not it", identity.secret_bytes()):
        assert secret.decode("latin-1") not in text
    assert base64.b64encode(identity.secret_bytes()).decode() not in text
    assert identity.secret_bytes().hex() not in text


def test_missing_passphrase_for_protected_key(saved) -> None:
    with pytest.raises(PassphraseError, match="no passphrase"):
        load_identity(saved[1], None)


def test_identity_repr_never_shows_secrets() -> None:
    identity = Identity.generate("x")
    shown = repr(identity) + str(identity)
    assert identity.secret_bytes().hex() not in shown and base64.b64encode(identity.secret_bytes()).decode() not in shown
    assert identity.key_id in shown


def test_ciphertext_swapped_between_files_is_detected(tmp_path: Path) -> None:
    """The AEAD's associated data binds ciphertext to key id and KDF parameters."""
    a, b = Identity.generate("a"), Identity.generate("b")
    pa, _ = save_identity(a, tmp_path / "a", PASSPHRASE, kdf=FAST_INSECURE_KDF)
    pb, _ = save_identity(b, tmp_path / "b", PASSPHRASE, kdf=FAST_INSECURE_KDF)
    fields = lambda p: dict(line.split(" = ", 1) for line in p.read_text().splitlines() if " = " in line)  # noqa: E731
    mixed = pa.read_text()
    for name in ("salt", "nonce", "ciphertext"):
        mixed = mixed.replace(fields(pa)[name], fields(pb)[name])
    with pytest.raises(PassphraseError):
        identity_from_text(mixed, PASSPHRASE)


def test_unprotected_key_warns(tmp_path: Path) -> None:
    identity = Identity.generate("demo")
    with pytest.warns(UnsafePlaintextKeyWarning):
        private, _ = save_identity(identity, tmp_path, None)
    assert not is_protected(private)
    with pytest.warns(UnsafePlaintextKeyWarning):
        assert load_identity(private, None).key_id == identity.key_id


def test_refuses_to_overwrite_existing_identity(saved, tmp_path: Path) -> None:
    before = saved[1].read_bytes()
    with pytest.raises(Exception, match="already exists"):
        save_identity(Identity.generate("st-marys"), tmp_path, PASSPHRASE, kdf=FAST_INSECURE_KDF)
    assert saved[1].read_bytes() == before


def test_public_file_is_small_readable_and_checked(saved) -> None:
    identity, _, public = saved
    text = public.read_text()
    assert len(text) < 600 and format_key_id(identity.key_id) in text and "st-marys" in text
    edited = text.replace(base64.b64encode(identity.public.sign_public).decode(), base64.b64encode(bytes(32)).decode())
    with pytest.raises(KeyMaterialError, match="does not match"):
        PublicIdentity.from_text(edited)


def test_pub_file_is_not_a_private_key(saved) -> None:
    with pytest.raises(KeyMaterialError, match="not a private key file") as caught:
        load_identity(saved[2], PASSPHRASE)
    assert ".key file" in caught.value.hint


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="not found"):
        load_identity(tmp_path / "nope.key", None)


def test_key_id_is_pinned() -> None:
    """Known answer, computed independently with
    ``(printf 'secure-oneshot/v1 key id\\0'; <bytes 0..63>) | openssl dgst -sha256`` (FORMAT.md section 1)."""
    assert compute_key_id(bytes(range(32)), bytes(range(32, 64))) == "f8c6e6f48564d3a45b8e598efaf9f9ee"


def test_invalid_names_are_refused() -> None:
    for bad in ("", "../etc", "a b", "x" * 65):
        with pytest.raises(KeyMaterialError):
            Identity.generate(bad)


# --- trust store -------------------------------------------------------------------------------


def test_trust_store_round_trip(tmp_path: Path) -> None:
    a, b = Identity.generate("site-a"), Identity.generate("server")
    expires = datetime(2027, 1, 1, tzinfo=timezone.utc)
    store = (
        TrustStore()
        .with_entry(TrustEntry(a.public, frozenset({"sender"}), expires, note='confirmed "by phone"'))
        .with_entry(TrustEntry(b.public, frozenset({"sender", "recipient"})))
        .with_revocation("ab" * 16, "lost", expires)
    )
    save_trust_store(store, tmp_path / "trust.toml")
    loaded = load_trust_store(tmp_path / "trust.toml")
    assert {e.identity for e in loaded.entries} == {a.public, b.public}
    assert loaded.find(a.key_id) == store.find(a.key_id)
    assert loaded.revocations == store.revocations


def test_trust_require_rules() -> None:
    a = Identity.generate("site-a")
    now = datetime(2026, 11, 26, tzinfo=timezone.utc)
    store = TrustStore().with_entry(TrustEntry(a.public, frozenset({"sender"}), expires=now + timedelta(days=1)))
    assert store.require(a.key_id, "sender", now) == a.public
    with pytest.raises(TrustError, match="not as recipient"):
        store.require(a.key_id, "recipient", now)
    with pytest.raises(TrustError, match="expired"):
        store.require(a.key_id, "sender", now + timedelta(days=2))
    with pytest.raises(TrustError, match="revoked"):
        store.with_revocation(a.key_id, "stolen").require(a.key_id, "sender", now)


@pytest.mark.parametrize(
    "text, message",
    [
        ("version = 1\ntypo = 3\n", "unknown key"),
        ("version = 2\n", "version must be 1"),
        ("version = 1\n[[identity]]\nname = 'x'\n", "missing field"),
        ("version = 1\n[[revoked]]\nkey_id = 'zz'\nrevoked_at = 2026-01-01T00:00:00Z\n", "32 lowercase hex"),
        ("version = 1\n[[revoked]]\nkey_id = '" + "a" * 32 + "'\nrevoked_at = 2026-01-01\n", "time zone"),
        ("version = [", "invalid TOML"),
    ],
)
def test_trust_store_errors_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trust_store_from_text(text)


def test_trust_store_unknown_identity_key_and_bad_role(tmp_path: Path) -> None:
    a = Identity.generate("a")
    store = TrustStore().with_entry(TrustEntry(a.public, frozenset({"sender"})))
    save_trust_store(store, tmp_path / "t.toml")
    text = (tmp_path / "t.toml").read_text()
    with pytest.raises(ConfigError, match="unknown key"):
        trust_store_from_text(text.replace('roles = ["sender"]', 'roles = ["sender"]\nrole = "admin"'))
    with pytest.raises(ConfigError, match="roles"):
        trust_store_from_text(text.replace('roles = ["sender"]', 'roles = ["admin"]'))


def test_no_warnings_for_protected_keys(saved) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_identity(saved[1], PASSPHRASE)

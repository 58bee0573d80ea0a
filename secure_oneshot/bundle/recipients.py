"""Per-recipient wrapping of the file key: ephemeral-static X25519 + HKDF + AEAD (FORMAT.md 5.2).

The design follows age's X25519 recipient stanza; nothing here is new cryptography.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
import nacl.exceptions
from nacl.bindings import crypto_scalarmult
from nacl.public import PrivateKey

from ..errors import BundleAuthError, KeyMaterialError, NotARecipientError
from ..keys.identity import Identity, PublicIdentity
from .format import MAX_RECIPIENTS, WRAP_INFO, Header, Stanza, hkdf

__all__ = ["check_recipients", "wrap_file_key", "unwrap_file_key"]

_ZERO_NONCE = bytes(12)


def _wrap_key(shared: bytes, epk: bytes, recipient_pk: bytes) -> bytes:
    if hmac.compare_digest(shared, bytes(32)):
        # An all-zero shared secret means a low-order public key: refuse (RFC 7748 section 6.1).
        raise BundleAuthError("X25519 produced an all-zero shared secret (low-order public key)")
    return hkdf(shared, epk + recipient_pk, WRAP_INFO)


def check_recipients(recipients: Sequence[PublicIdentity]) -> list[PublicIdentity]:
    """Return ``recipients`` as a list if a bundle can be sealed to them (FORMAT.md 4.2).

    A key named twice (the same file given twice, or two files holding the same
    keys under different names) would give two stanzas with one key id, which
    every reader must refuse, so it is refused before anything is sealed.

    Raises:
        KeyMaterialError: no recipient, more than the format allows, or one key listed twice.
    """
    listed = list(recipients)
    if not 1 <= len(listed) <= MAX_RECIPIENTS:
        raise KeyMaterialError(
            f"a bundle needs 1 to {MAX_RECIPIENTS} recipients, got {len(listed)}",
            hint=f"give between 1 and {MAX_RECIPIENTS} recipients' public identities with --to",
        )
    seen: dict[str, PublicIdentity] = {}
    for recipient in listed:
        first = seen.setdefault(recipient.key_id, recipient)
        if first is not recipient:
            also = "" if first.name == recipient.name else f" (also as {first.name})"
            raise KeyMaterialError(
                f"recipient {recipient.name}{also} with key id {recipient.key_id} is listed twice",
                hint="name each recipient once",
            )
    return listed


def wrap_file_key(file_key: bytes, recipient: PublicIdentity, ephemeral_secret: bytes | None = None) -> Stanza:
    """Wrap ``file_key`` to ``recipient``.  ``ephemeral_secret`` is for test vectors only."""
    ephemeral = PrivateKey(ephemeral_secret) if ephemeral_secret is not None else PrivateKey.generate()
    epk = bytes(ephemeral.public_key)
    try:
        shared = crypto_scalarmult(bytes(ephemeral), recipient.encrypt_public)
    except nacl.exceptions.RuntimeError as e:  # libsodium refuses low-order points
        raise KeyMaterialError(f"recipient {recipient.name} has an invalid X25519 public key") from e
    wrapped = ChaCha20Poly1305(_wrap_key(shared, epk, recipient.encrypt_public)).encrypt(_ZERO_NONCE, file_key, None)
    return Stanza(recipient.key_id, epk, wrapped)


def unwrap_file_key(header: Header, identity: Identity) -> bytes:
    """Find ``identity``'s stanza in ``header`` and recover the file key (FORMAT.md 7 step 6).

    Raises:
        NotARecipientError: no stanza names this identity's key id.
        BundleAuthError: the stanza does not decrypt (modified or swapped in from another bundle).
    """
    stanza = next((s for s in header.recipients if s.key_id == identity.key_id), None)
    if stanza is None:
        raise NotARecipientError(
            f"bundle {header.bundle_id} is not encrypted to {identity.name} ({identity.key_id})",
            hint=f"its recipients are {', '.join(header.recipient_ids)}; open it with one of those identities",
        )
    try:
        shared = identity.x25519(stanza.epk)
        wrap_key = _wrap_key(shared, stanza.epk, identity.public.encrypt_public)
        return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, stanza.wrapped_key, None)
    except (InvalidTag, nacl.exceptions.RuntimeError) as e:
        raise BundleAuthError(
            f"the key stanza for {identity.key_id} does not decrypt: the bundle header was modified or assembled from other bundles"
        ) from e

"""Identities (Ed25519 + X25519), private key files and the trust store."""

from .identity import Identity, PublicIdentity, compute_key_id, format_key_id
from .keyfile import (
    FAST_INSECURE_KDF,
    MODERATE_KDF,
    KdfParams,
    UnsafePlaintextKeyWarning,
    identity_from_text,
    is_protected,
    load_identity,
    load_public,
    save_identity,
)
from .trust import ROLES, Revocation, TrustEntry, TrustStore, load_trust_store, save_trust_store

__all__ = [
    "Identity",
    "PublicIdentity",
    "compute_key_id",
    "format_key_id",
    "KdfParams",
    "MODERATE_KDF",
    "FAST_INSECURE_KDF",
    "UnsafePlaintextKeyWarning",
    "identity_from_text",
    "is_protected",
    "load_identity",
    "load_public",
    "save_identity",
    "ROLES",
    "TrustEntry",
    "Revocation",
    "TrustStore",
    "load_trust_store",
    "save_trust_store",
]

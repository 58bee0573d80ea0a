"""The secure-oneshot/v1 bundle: format (FORMAT.md), sealing, inspection, verification, replay ledger."""

from .format import DEFAULT_CHUNK_SIZE, Header, Manifest, Stanza
from .inspect import inspect_bundle
from .ledger import ReplayLedger
from .safetensors_strict import PayloadLimits, TensorPayload, parse_payload, serialize_tensors
from .seal import SealResult, UnsafeDeterministicRandomWarning, seal_safetensors_file, seal_tensors
from .verify import OpenedBundle, VerifiedBundle, VerifyOptions, check_freshness, open_bundle, verify_bundle

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Header",
    "Manifest",
    "Stanza",
    "inspect_bundle",
    "ReplayLedger",
    "PayloadLimits",
    "TensorPayload",
    "parse_payload",
    "serialize_tensors",
    "SealResult",
    "UnsafeDeterministicRandomWarning",
    "seal_safetensors_file",
    "seal_tensors",
    "OpenedBundle",
    "VerifyOptions",
    "check_freshness",
    "open_bundle",
    "VerifiedBundle",
    "verify_bundle",
]

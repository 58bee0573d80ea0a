"""The secure-oneshot/v1 bundle: format (FORMAT.md), sealing, inspection, verification, replay ledger."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .format import DEFAULT_CHUNK_SIZE, Header, Manifest, Stanza
    from .inspect import inspect_bundle
    from .ledger import ReplayLedger
    from .safetensors_strict import PayloadLimits, TensorPayload, parse_payload, serialize_tensors
    from .seal import SealResult, UnsafeDeterministicRandomWarning, seal_safetensors_file, seal_tensors
    from .verify import OpenedBundle, VerifiedBundle, VerifyOptions, check_freshness, open_bundle, verify_bundle

# Names are resolved on first use (PEP 562), so ``from secure_oneshot.bundle import verify_bundle`` loads the
# verifier's modules without the writer's, and no command pays for SQLite (the ledger) unless it keeps one.
_EXPORTS = {
    "DEFAULT_CHUNK_SIZE": "format", "Header": "format", "Manifest": "format", "Stanza": "format",
    "inspect_bundle": "inspect",
    "ReplayLedger": "ledger",
    "PayloadLimits": "safetensors_strict", "TensorPayload": "safetensors_strict", "parse_payload": "safetensors_strict",
    "serialize_tensors": "safetensors_strict",
    "SealResult": "seal", "UnsafeDeterministicRandomWarning": "seal", "seal_safetensors_file": "seal", "seal_tensors": "seal",
    "OpenedBundle": "verify", "VerifyOptions": "verify", "check_freshness": "verify", "open_bundle": "verify",
    "VerifiedBundle": "verify", "verify_bundle": "verify",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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

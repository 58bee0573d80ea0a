"""Known-answer test vectors (FORMAT.md section 11): each declares its expected outcome."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest

from secure_oneshot._internal.compat import tomllib
from secure_oneshot.bundle import open_bundle
from secure_oneshot.errors import (
    BundleAuthError,
    BundleFormatError,
    FreshnessError,
    NotARecipientError,
    TensorPayloadError,
    TrustError,
)
from secure_oneshot.keys import load_identity, load_trust_store

from .vectors import generate

VECTORS = Path(__file__).parent / "vectors"
EXPECTED = {
    "format": (BundleFormatError, 5),
    "auth": (BundleAuthError, 6),
    "trust": (TrustError, 10),
    "freshness": (FreshnessError, 12),
    "payload": (TensorPayloadError, 13),
    "not-recipient": (NotARecipientError, 4),
}
NAMES = sorted(p.stem for p in VECTORS.glob("*.sob"))


def declaration(name: str) -> dict:
    return tomllib.loads((VECTORS / f"{name}.toml").read_text())


def test_every_outcome_is_covered() -> None:
    kinds = {declaration(n)["expect"] for n in NAMES}
    assert kinds == set(EXPECTED) | {"success"}
    assert len(NAMES) >= 12


@pytest.mark.parametrize("name", NAMES)
def test_vector(name: str) -> None:
    spec = declaration(name)
    bundle = VECTORS / f"{name}.sob"
    assert hashlib.sha256(bundle.read_bytes()).hexdigest() == spec["bundle_sha256"], "vector file changed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test-only keys are unprotected on purpose
        recipient = load_identity(VECTORS / "keys" / f"{spec['recipient']}.key", None)
    trust = load_trust_store(VECTORS / "keys" / "trust.toml")
    if spec["expect"] == "success":
        opened = open_bundle(bundle, recipient, trust, now=spec["now"])
        assert hashlib.sha256(opened.payload_bytes).hexdigest() == spec["payload_sha256"]
        return
    error, code = EXPECTED[spec["expect"]]
    with pytest.raises(error) as caught:
        open_bundle(bundle, recipient, trust, now=spec["now"])
    assert type(caught.value) is error and caught.value.exit_code == code


def test_writer_reproduces_the_vectors_byte_for_byte() -> None:
    """The generator runs the current writer: any format or writer change breaks this."""
    for name, (data, _) in generate.build_bundles().items():
        assert data == (VECTORS / f"{name}.sob").read_bytes(), f"{name} changed: regenerate only for a deliberate format change"

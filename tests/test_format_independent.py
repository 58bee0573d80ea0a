"""A second, minimal reader written from FORMAT.md alone, using different libraries.

It uses ``cryptography``'s X25519/Ed25519 (the package uses pynacl for those)
and only the standard library otherwise, and imports nothing from
``secure_oneshot``.  If it opens the committed vector and reproduces every
intermediate value, the spec is complete enough to implement from.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from secure_oneshot._internal.compat import tomllib

VECTORS = Path(__file__).parent / "vectors"
KAT = {k: bytes.fromhex(v) for k, v in tomllib.loads((VECTORS / "ok_one_recipient.intermediate.toml").read_text()).items()}


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def read(data: bytes) -> dict:
    """FORMAT.md 4.1 and 5-7, the success path only."""
    assert data[:18] == b"secure-oneshot/v1\n"
    n = int.from_bytes(data[18:22], "big")
    header_bytes, header = data[: 22 + n], json.loads(data[22 : 22 + n])
    mac, stream = data[22 + n : 22 + n + 32], data[22 + n + 32 :]
    server = X25519PrivateKey.from_private_bytes(KAT["server_x25519_secret"])
    recipient_pk = server.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    stanza = header["recipients"][0]
    epk = base64.b64decode(stanza["epk"])
    shared = server.exchange(X25519PublicKey.from_public_bytes(epk))
    wrap_key = hkdf(shared, epk + recipient_pk, b"secure-oneshot/v1 x25519 wrap")
    file_key = ChaCha20Poly1305(wrap_key).decrypt(bytes(12), base64.b64decode(stanza["wrapped_key"]), None)
    mac_key = hkdf(file_key, b"", b"secure-oneshot/v1 header mac")
    assert hmac.compare_digest(mac, hmac.new(mac_key, header_bytes, hashlib.sha256).digest())
    stream_key = hkdf(file_key, hashlib.sha256(header_bytes).digest(), b"secure-oneshot/v1 payload")
    size = header["chunk_size"] + 16
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    plaintext = b"".join(
        ChaCha20Poly1305(stream_key).decrypt(i.to_bytes(11, "big") + bytes([i == len(chunks) - 1]), c, None)
        for i, c in enumerate(chunks)
    )
    payload, trailer = plaintext[: header["payload_size"]], plaintext[header["payload_size"] :]
    m = int.from_bytes(trailer[:4], "big")
    manifest, signature = trailer[4 : 4 + m], trailer[4 + m :]
    return {"shared": shared, "wrap_key": wrap_key, "file_key": file_key, "mac_key": mac_key, "stream_key": stream_key,
            "header_sha256": hashlib.sha256(header_bytes).digest(), "header_mac": mac, "epk": epk,
            "header": header, "payload": payload, "manifest": manifest, "signature": signature}


def test_independent_reader_matches_every_intermediate_value() -> None:
    got = read((VECTORS / "ok_one_recipient.sob").read_bytes())
    for name in ("shared", "wrap_key", "file_key", "mac_key", "stream_key", "header_sha256", "header_mac", "epk"):
        assert got[name] == KAT[name], name
    assert bytes(X25519PrivateKey.from_private_bytes(KAT["ephemeral_secret"]).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)) == KAT["epk"]


def test_independent_reader_verifies_signature_and_digest() -> None:
    got = read((VECTORS / "ok_one_recipient.sob").read_bytes())
    site_public = Ed25519PrivateKey.from_private_bytes(KAT["site_ed25519_seed"]).public_key()
    site_public.verify(got["signature"], b"secure-oneshot/v1 manifest\x00" + got["manifest"])  # raises if invalid
    manifest = json.loads(got["manifest"])
    assert manifest["payload_sha256"] == hashlib.sha256(got["payload"]).hexdigest()
    assert manifest["recipients"] == [s["key_id"] for s in got["header"]["recipients"]]
    assert json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() == got["manifest"]  # canonical

"""Read a bundle's public header without any key (FORMAT.md 7 steps 1-2).

Nothing read here is authenticated yet: the header MAC needs the file key and
the signature needs the stream.  ``inspect`` output says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import BundleFormatError
from .format import MAC_SIZE, MAGIC, MAX_HEADER_LEN, Header

__all__ = ["RawHeader", "read_header", "inspect_bundle"]


@dataclass(frozen=True)
class RawHeader:
    """A parsed header with the exact bytes it came from and where the stream starts."""

    header: Header
    header_bytes: bytes  # magic || u32be(len) || header JSON: what the MAC covers
    mac: bytes
    stream_offset: int


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise BundleFormatError(f"bundle ends inside the {what} (file truncated?)")
    return data


def read_header(src: BinaryIO) -> RawHeader:
    """Parse magic, header and MAC from ``src`` positioned at the start of a bundle.

    Raises:
        BundleFormatError: not a v1 bundle, or a malformed header.
    """
    magic = src.read(len(MAGIC))
    if magic != MAGIC:
        if magic.startswith(b"secure-oneshot/"):
            raise BundleFormatError(
                f"unsupported bundle version {magic.strip().decode('ascii', 'replace')!r}",
                hint="upgrade secure-oneshot to read this bundle",
            )
        raise BundleFormatError("not a secure-oneshot bundle (bad magic bytes)")
    length = int.from_bytes(_read_exact(src, 4, "header length"), "big")
    if not 1 <= length <= MAX_HEADER_LEN:
        raise BundleFormatError(f"header length {length} out of range 1..{MAX_HEADER_LEN}")
    body = _read_exact(src, length, "header")
    header = Header.from_json_bytes(body)
    mac = _read_exact(src, MAC_SIZE, "header MAC")
    return RawHeader(header, magic + length.to_bytes(4, "big") + body, mac, len(MAGIC) + 4 + length + MAC_SIZE)


def _open_file(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 - returned to the caller's with-block
    except FileNotFoundError as e:
        raise BundleFormatError(f"bundle {path} not found", hint="check the path") from e
    except IsADirectoryError as e:
        raise BundleFormatError(f"{path} is a directory, not a bundle") from e


def inspect_bundle(path: str | os.PathLike[str]) -> Header:
    """The public header of the bundle at ``path`` (no keys needed, nothing verified)."""
    with _open_file(Path(path)) as f:
        return read_header(f).header

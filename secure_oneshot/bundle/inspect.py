"""Read a bundle's public header without any key (FORMAT.md 7 steps 1-2).

Nothing read here is authenticated yet: the header MAC needs the file key and
the signature needs the stream.  ``inspect`` output says so.

Work and memory are bounded by the format's maxima whatever the file holds: at
most 18 + 4 + 65536 + 32 bytes are read, and the header's ``payload_size`` and
``chunk_size`` are checked against the file's real length (``fstat``) before
any caller allocates from them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import BundleFormatError, ResourceError
from .format import MAC_SIZE, MAGIC, MAX_HEADER_LEN, Header, check_stream_length

__all__ = ["RawHeader", "read_header", "inspect_bundle"]


@dataclass(frozen=True)
class RawHeader:
    """A parsed header with the exact bytes it came from and where the stream starts."""

    header: Header
    header_bytes: bytes  # magic || u32be(len) || header JSON: what the MAC covers
    mac: bytes
    stream_offset: int
    stream_length: int  # bytes from stream_offset to the end of the file, as fstat reports it


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise BundleFormatError(f"bundle ends inside the {what} (file truncated?)")
    return data


def _file_length(src: BinaryIO) -> int:
    """The real length of ``src``: fstat for files, seek/tell for in-memory streams."""
    try:
        return os.fstat(src.fileno()).st_size
    except (AttributeError, OSError, ValueError):  # io.BytesIO and friends have no descriptor
        position = src.tell()
        end = src.seek(0, os.SEEK_END)
        src.seek(position)
        return end


def read_header(src: BinaryIO, *, max_payload_bytes: int | None = None) -> RawHeader:
    """Parse magic, header and MAC from ``src`` positioned at the start of a bundle.

    Also checks the header's sizes against ``max_payload_bytes`` (when given) and
    the file's real length, so callers may allocate from ``payload_size`` afterwards.

    Raises:
        BundleFormatError: not a v1 bundle, a malformed header, a payload over
            ``max_payload_bytes``, or a file longer than its header allows.
        BundleAuthError: a file shorter than its header needs (truncated).
    """
    file_length = _file_length(src)
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
    if max_payload_bytes is not None and header.payload_size > max_payload_bytes:
        raise BundleFormatError(
            f"payload of {header.payload_size} bytes exceeds the limit of {max_payload_bytes}",
            hint="raise the limit (--max-bytes, or the ingest policy's max_bundle_bytes) if this bundle is expected",
        )
    stream_offset = len(MAGIC) + 4 + length + MAC_SIZE
    check_stream_length(header, file_length - stream_offset)
    return RawHeader(header, magic + length.to_bytes(4, "big") + body, mac, stream_offset, file_length - stream_offset)


def _open_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for reading; anything else (directory, FIFO, device) is refused.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; it changes nothing for
    regular files.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as e:
        raise BundleFormatError(f"bundle {path} not found", hint="check the path") from e
    except IsADirectoryError as e:
        raise BundleFormatError(f"{path} is a directory, not a bundle") from e
    except ValueError as e:  # e.g. a NUL byte in the name
        raise BundleFormatError(f"cannot open bundle {path!r}: {e}") from e
    except OSError as e:
        raise ResourceError(f"cannot read bundle {path}: {e.strerror}", hint="check the path and its permissions") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise BundleFormatError(f"{path} is {kind}, not a bundle")
    return os.fdopen(fd, "rb")


def inspect_bundle(path: str | os.PathLike[str]) -> Header:
    """The public header of the bundle at ``path`` (no keys needed, nothing verified).

    Raises:
        BundleFormatError, BundleAuthError: as :func:`read_header`.
    """
    with _open_file(Path(path)) as f:
        return read_header(f).header

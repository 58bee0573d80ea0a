"""What travels on Flower: the request record, and the reply's one opaque bundle Array with its public header."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from . import BUNDLE_STYPE, REQUEST_ID_KEY

__all__ = ["REQUEST_RECORD", "BUNDLE_RECORD", "HEADER_RECORD", "request_content", "reply_content", "bundle_bytes"]

REQUEST_RECORD = "request"   # ConfigRecord: {"request-id": str}
BUNDLE_RECORD = "bundle"     # ArrayRecord: {"bundle": Array(dtype="uint8", shape=[n], stype=BUNDLE_STYPE, data=<the file>)}
HEADER_RECORD = "header"     # ConfigRecord: the bundle's public header fields (informational; ingest reads the bytes)


def request_content(request_id: str) -> RecordDict:
    return RecordDict({REQUEST_RECORD: ConfigRecord({REQUEST_ID_KEY: request_id})})


def reply_content(data: bytes, header: dict[str, Any]) -> RecordDict:
    array = Array(dtype="uint8", shape=(len(data),), stype=BUNDLE_STYPE, data=data)
    fields = {k: v for k, v in header.items() if isinstance(v, (str, int)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))}
    return RecordDict({BUNDLE_RECORD: ArrayRecord({BUNDLE_RECORD: array}), HEADER_RECORD: ConfigRecord(fields)})


def bundle_bytes(content: RecordDict) -> bytes:
    """The reply's bundle bytes, or ``ValueError`` saying why the reply is not exactly one bundle Array."""
    records = content.array_records
    if set(records.keys()) != {BUNDLE_RECORD}:
        raise ValueError(f"expected one array record {BUNDLE_RECORD!r}, got {sorted(records.keys())[:8]}")
    arrays = records[BUNDLE_RECORD]
    if set(arrays.keys()) != {BUNDLE_RECORD}:
        raise ValueError(f"expected one array {BUNDLE_RECORD!r}, got {len(arrays)} arrays")
    array = arrays[BUNDLE_RECORD]
    if array.stype != BUNDLE_STYPE or array.dtype != "uint8" or len(array.shape) != 1 or array.shape[0] != len(array.data):
        raise ValueError(f"not a bundle array (stype {str(array.stype)[:40]!r}, dtype {str(array.dtype)[:16]!r}, shape {list(array.shape)[:4]})")
    return bytes(array.data)

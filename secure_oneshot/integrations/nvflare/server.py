"""The server side of the NVFlare job, without NVFlare: one result per site, the inbox delivery and the report.

The settings file has the same format as the Flower server's (``examples/nvflare/nvflare-server.toml``); ``nodes``
is the number of NVFlare clients to wait for.  A reply's bundle bytes are written into the inbox exactly as received
(atomically, under a name built only from values the server chose) and the same ingest as ``secure-oneshot ingest``
judges them (``flower.server.ingest_round``: verification, replay ledger, quarantine).  The round report
(``<server_dir>/nvflare-round.json``) lists every site: delivered (with its ingest outcome), refused by its site,
blocked or failed at the site (NVFlare's return code), no reply (absent or timed out) or malformed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..._internal.atomic import atomic_write_bytes
from ...server.ingest import IngestFolders
from ..flower.server import ServerSettings, load_server_settings, one_line, outcome_counts  # platform-neutral despite the package name
from . import BUNDLE_PARAM, REASON_KEY, STATUS_KEY

__all__ = ["SiteResult", "RoundReport", "record_reply", "record_error", "deliver", "write_report", "load_server_settings",
           "ServerSettings", "REPORT_NAME"]

REPORT_NAME = "nvflare-round.json"


@dataclass
class SiteResult:
    site: str
    index: int                   # the site's position in the round (the inbox name uses it, never the site's name)
    request_id: str
    status: str = "no reply"     # "delivered" | "refused" | "error" | "no reply" | "malformed"
    reason: str = "no reply within reply_seconds (absent or timed out)"
    inbox_file: str = ""
    wire_bytes: int = 0
    ingest: dict[str, Any] = field(default_factory=dict)
    request_id_bound: bool | None = None


@dataclass
class RoundReport:
    nodes_expected: int
    sites: list[SiteResult]
    distilled: str = ""

    def counts(self) -> dict[str, int]:
        return outcome_counts(self.sites)

    @property
    def results(self) -> list[SiteResult]:   # what flower.server.ingest_round walks
        return self.sites

    def to_json(self) -> dict[str, Any]:
        return {"nodes_expected": self.nodes_expected, "nodes_seen": len(self.sites), "counts": self.counts(),
                "results": [asdict(r) for r in self.sites], "distilled": self.distilled}


def deliver(folders: IngestFolders, result: SiteResult, data: bytes) -> None:
    """Write one reply's bytes into the inbox, atomically, under a name built only from values the server chose."""
    folders.inbox.mkdir(parents=True, exist_ok=True)
    name = f"nvflare-{result.index:04d}-{result.request_id}.sob"
    atomic_write_bytes(folders.inbox / name, data)
    result.inbox_file, result.wire_bytes = name, len(data)


def record_reply(folders: IngestFolders, result: SiteResult, params: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> None:
    """One site's reply: a refusal (its reason), a bundle (into the inbox) or something malformed (reported)."""
    if result.status != "no reply":
        return  # NVFlare delivers one result per task and client; anything further is not ours to judge twice
    params = params or {}
    if meta.get(STATUS_KEY) == "refused" and not params:
        result.status, result.reason = "refused", one_line(meta.get(REASON_KEY) or "refused without a reason")
        return
    value = params.get(BUNDLE_PARAM) if isinstance(params, Mapping) and set(params) == {BUNDLE_PARAM} else None
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        data = value.tobytes()
    elif isinstance(value, bytes):
        data = value
    else:
        result.status, result.reason = "malformed", f"not one {BUNDLE_PARAM!r} uint8 array (parameters: {sorted(map(str, params))[:8]})"
        return
    result.status, result.reason = "delivered", ""
    deliver(folders, result, data)


def record_error(result: SiteResult, return_code: str) -> None:
    """A result NVFlare marked as failed: the site's filter blocked it, or the client script failed."""
    if result.status == "no reply":
        result.status, result.reason = "error", one_line(f"the site returned NVFlare code {return_code} (blocked by its filter or failed)")


def write_report(settings: ServerSettings, report: RoundReport) -> Path:
    path = Path(settings.server_dir) / REPORT_NAME
    atomic_write_bytes(path, (json.dumps(report.to_json(), indent=2) + "\n").encode("utf-8"))
    return path

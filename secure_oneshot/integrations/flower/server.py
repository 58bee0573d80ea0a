"""The server side of the Flower app, without Flower: its settings, the inbox delivery, ingest and the round report.

A reply's bundle bytes are written into the inbox exactly as received (atomically, under a generated name), and the
same :func:`~secure_oneshot.server.ingest.ingest_inbox` as ``secure-oneshot ingest`` judges them: verification,
replay ledger, quarantine.  Nothing a platform delivers reaches ``accepted/`` any other way.  The round report
(``<server_dir>/flower-round.json``) lists every node: delivered (with its ingest outcome), refused by its site
(the site's one-line reason), no reply (offline or timed out) or malformed (not one bundle array).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..._internal.atomic import atomic_write_bytes
from ..._internal.strict_toml import positive
from ..._internal.termsafe import printable
from ...errors import ConfigError
from ...keys import Identity, load_identity, load_trust_store
from ...keys.keyfile import UnsafePlaintextKeyWarning
from ...policy.load import load_ingest_policy
from ...server.ingest import IngestFolders, ingest_inbox
from .site import read_settings

__all__ = ["ServerSettings", "load_server_settings", "NodeResult", "RoundReport", "deliver", "ingest_round", "REPORT_NAME"]

REPORT_NAME = "flower-round.json"
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class ServerSettings:
    """The study server's settings for one Flower round (see ``examples/flower/flower-server.toml``)."""

    server_dir: Path
    key: Path
    trust: Path
    ingest_policy: Path
    nodes: int = 1                 # how many SuperNodes to wait for
    wait_seconds: float = 60.0     # how long to wait for them
    reply_seconds: float = 600.0   # how long to wait for the replies
    passphrase_env: str = ""
    distill: bool = False
    distill_preset: str = "cpu"
    distill_epochs: int | None = None   # None: the preset's

    def identity(self) -> Identity:
        passphrase = None
        if self.passphrase_env:
            value = os.environ.get(self.passphrase_env)
            if value is None:
                raise ConfigError(f"the passphrase variable {self.passphrase_env} is not set", hint="set it where the ServerApp runs")
            passphrase = value.encode("utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnsafePlaintextKeyWarning)
            return load_identity(self.key, passphrase)


def load_server_settings(path: Path) -> ServerSettings:
    """Read the server settings strictly (unknown keys are errors); relative paths are relative to the file."""
    t, problems = read_settings(path, "server settings", "check the run config's server-config")
    where = lambda v: path.parent / (v or "")  # noqa: E731
    settings = ServerSettings(
        server_dir=where(t.get("server_dir", "string")), key=where(t.get("key", "string")), trust=where(t.get("trust", "string")),
        ingest_policy=where(t.get("ingest_policy", "string")), nodes=t.get("nodes", "integer", 1, positive),
        wait_seconds=float(t.get("wait_seconds", "number", 60.0, positive)), reply_seconds=float(t.get("reply_seconds", "number", 600.0, positive)),
        passphrase_env=t.get("passphrase_env", "string", ""), distill=t.get("distill", "boolean", False),
        distill_preset=t.get("distill_preset", "string", "cpu"), distill_epochs=t.get("distill_epochs", "integer", None, positive),
    )
    t.finish()
    problems.raise_if_any()
    return settings


@dataclass
class NodeResult:
    node_id: int
    request_id: str
    status: str                  # "delivered" | "refused" | "no reply" | "malformed"
    reason: str = ""             # the site's refusal or what was wrong, one escaped line
    inbox_file: str = ""
    wire_bytes: int = 0          # the bundle's bytes as received
    ingest: dict[str, Any] = field(default_factory=dict)   # the BundleOutcome, when delivered
    request_id_bound: bool | None = None   # accepted bundles: does the signed manifest carry the id sent?
    copy: int = 0                # 1, 2, ...: a further reply from the same node to the same request


def outcome_counts(results: Any) -> dict[str, int]:
    """Sites per outcome: ingest's outcome for a delivered reply, else the delivery status (refused, absent, ...).
    ``results`` are any records with ``status`` and ``ingest`` (this module's and the NVFlare adapter's)."""
    out: dict[str, int] = {}
    for r in results:
        key = r.ingest.get("outcome", r.status) if r.status == "delivered" else r.status
        out[key] = out.get(key, 0) + 1
    return out


@dataclass
class RoundReport:
    nodes_expected: int
    nodes_seen: int
    results: list[NodeResult]
    distilled: str = ""

    def counts(self) -> dict[str, int]:
        return outcome_counts(self.results)

    def to_json(self) -> dict[str, Any]:
        return {"nodes_expected": self.nodes_expected, "nodes_seen": self.nodes_seen, "counts": self.counts(),
                "results": [asdict(r) for r in self.results], "distilled": self.distilled}


def one_line(text: str) -> str:
    return printable(" ".join(str(text).split()))[:MAX_REASON_CHARS]


def deliver(folders: IngestFolders, result: NodeResult, data: bytes) -> None:
    """Write one reply's bytes into the inbox, atomically, under a name built only from numbers the server chose."""
    folders.inbox.mkdir(parents=True, exist_ok=True)
    name = f"flower-{result.node_id}-{result.request_id}-{result.copy:03d}.sob"   # ingest takes them in this order
    atomic_write_bytes(folders.inbox / name, data)
    result.inbox_file, result.wire_bytes = name, len(data)


def _bound(folders: IngestFolders, bundle_id: str, request_id: str) -> bool:
    entry = json.loads((folders.accepted / f"{bundle_id}.json").read_text(encoding="utf-8"))
    meta = entry.get("manifest", {}).get("meta", {})
    return isinstance(meta, dict) and meta.get("request_id") == request_id


def ingest_round(settings: ServerSettings, report: RoundReport, identity: Identity) -> None:
    """Run the same ingest as ``secure-oneshot ingest`` over the inbox; attach each delivered file's outcome."""
    folders = IngestFolders.under(settings.server_dir)
    folders.inbox.mkdir(parents=True, exist_ok=True)   # a round in which no site delivered ingests an empty inbox
    outcomes = ingest_inbox(folders, identity, load_trust_store(settings.trust), load_ingest_policy(settings.ingest_policy), wait=True)
    by_file = {o.file: o for o in outcomes}
    for r in report.results:
        outcome = by_file.get(r.inbox_file) if r.inbox_file else None
        if outcome is None:
            continue
        r.ingest = {k: v for k, v in asdict(outcome).items() if k in ("outcome", "bundle_id", "sender", "error", "reason", "stored_as", "reason_file")}
        if outcome.outcome == "accepted":
            r.request_id_bound = _bound(folders, outcome.bundle_id, r.request_id)


def write_report(settings: ServerSettings, report: RoundReport) -> Path:
    path = Path(settings.server_dir) / REPORT_NAME
    atomic_write_bytes(path, (json.dumps(report.to_json(), indent=2) + "\n").encode("utf-8"))
    return path


def distill_accepted(settings: ServerSettings, identity: Identity) -> str:
    """The optional distillation (imports the ML stack only here)."""
    from ...server.study import DistillJob, load_accepted, run_distillation

    folders = IngestFolders.under(settings.server_dir)
    sites = load_accepted(folders, identity, load_trust_store(settings.trust))
    out = Path(settings.server_dir) / "global"
    run_distillation(sites, out, DistillJob(preset=settings.distill_preset, epochs=settings.distill_epochs), audit_to=(folders.audit_log, identity))
    return str(out)

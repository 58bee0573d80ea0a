"""A small study for the platform adapters' tests (Flower, NVFlare): hospitals with their settings files, the
server's settings, the identities, and what the tests read back (audit events, ingest folders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from secure_oneshot import audit
from secure_oneshot.server.ingest import IngestFolders


@dataclass
class PlatformStudy:
    root: Path
    site_configs: dict[str, Path]   # hospital -> its platform settings file
    server_config: Path
    ids: dict

    def audit_events(self, name: str) -> list[audit.AuditEvent]:
        return [r.event for r in audit.verify_log(self.root / "sites" / name / "audit.jsonl", self.ids[name].public)]

    @property
    def folders(self) -> IngestFolders:
        return IngestFolders.under(self.root / "server")

"""Builders for the hostile-ingest and accepted-registry tests: a server folder, real small-CNN bundles, reason files."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import torch

from secure_oneshot.bundle import seal_tensors
from secure_oneshot.models.classifier import ClassifierConfig, build_classifier
from secure_oneshot.policy.load import load_ingest_policy
from secure_oneshot.server.ingest import BundleOutcome, IngestFolders, ingest_inbox

from .conftest import NOW
from .policy_helpers import POLICIES, VECTOR_KEYS, load_cast

CAST = load_cast()
CLASSIFIER_META = {"artifacts": {"classifier": {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2, "norm": "batch"}}}


def small_cnn_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A real small-CNN state dict under ``classifier/`` (so ``load_accepted`` can build it)."""
    torch.manual_seed(seed)
    model = build_classifier(ClassifierConfig("small-cnn", 1, 2))
    return {f"classifier/{k}": v.detach().clone() for k, v in model.state_dict().items()}


def seal(path: Path, *, sender=None, seed: int = 0, now: datetime = NOW) -> Path:
    """A bundle from the site (or ``sender``) to the server that the example ingest policy accepts."""
    seal_tensors(small_cnn_tensors(seed), path, sender=sender or CAST.site, recipients=[CAST.server.public],
                 meta=CLASSIFIER_META, now=now)
    return path


def server_policy_copy(root: Path) -> Path:
    """A private copy of the example ingest policy (tests may edit it)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(POLICIES / "server-ingest.toml", root / "server-ingest.toml"))


def run_ingest(root: Path, policy_path: Path | None = None, **kwargs) -> tuple[IngestFolders, list[BundleOutcome]]:
    folders = IngestFolders.under(root)
    policy = load_ingest_policy(policy_path or POLICIES / "server-ingest.toml")
    return folders, ingest_inbox(folders, CAST.server, CAST.server_trust(), policy, NOW, **kwargs)


def reasons(folders: IngestFolders) -> dict[str, dict]:
    """Quarantine reason files by the (escaped) original inbox name they record."""
    found = [json.loads(p.read_text()) for p in folders.quarantine.glob("*.reason.json")]
    by_name = {r["file"]: r for r in found}
    assert len(by_name) == len(found)
    return by_name


def server_cli_args(root: Path) -> list[str]:
    """Key and trust arguments for the server's CLI commands (the test-vector keys are unprotected)."""
    trust = root / "server-trust.toml"
    if not trust.exists():
        shutil.copy(VECTOR_KEYS / "trust.toml", trust)
    return ["--key", str(VECTOR_KEYS / "server.key"), "--trust", str(trust)]

"""The sub-command table: name -> the module that registers and runs it, and its one-line help.

Kept free of imports so that ``--version``, ``--help`` and every transfer-path
command load only what they use: :func:`secure_oneshot.cli.main` imports a
command's module only when that command runs (``tests/test_lean_imports.py``).
Each module's ``register`` builds the full sub-parser; ``tests/test_cli.py``
checks that this table and the registered commands agree.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Command", "COMMANDS", "module_of"]


@dataclass(frozen=True)
class Command:
    name: str
    module: str     # under secure_oneshot.cli
    help: str


COMMANDS = (
    Command("keys", "keys_cmd", "create and show identities; manage the trust store"),
    Command("seal", "bundle_cmd", "sign and encrypt a safetensors file into a bundle (low level; see export)"),
    Command("inspect", "bundle_cmd", "print a bundle's public header (no key needed, nothing verified)"),
    Command("verify", "bundle_cmd", "fully verify a bundle with your key; writes nothing"),
    Command("open", "bundle_cmd", "verify a bundle and write its safetensors payload (mode 0600)"),
    Command("policy", "policy_cmd", "check, explain, sign and verify policy files"),
    Command("export", "export_cmd", "policy-checked, signed, encrypted, audited export of a trained model"),
    Command("ingest", "export_cmd", "verify an inbox of bundles; accept or quarantine each"),
    Command("audit", "audit_cmd", "verify and read a hash-chained, signed audit log"),
    Command("data", "data_cmd", "check a site's own images (folder, CSV manifest, DICOM) before training"),
    Command("train", "train_cmd", "train a site's classifier (and optional generator) into a model directory"),
    Command("partition", "train_cmd", "split train+val of a MedMNIST set among sites (IID or Dirichlet)"),
    Command("distill", "distill_cmd", "distil one global model from the accepted site models (server)"),
    Command("demo", "distill_cmd", "the whole study end to end on one machine: keys, sites, bundles, ingest, distillation"),
    Command("audit-privacy", "research_cmd", "membership-inference audit of a trained model directory (runs at the site)"),
    Command("experiment", "research_cmd", "run a privacy-utility study grid through the real pipeline (resumable)"),
)


def module_of(name: str) -> str | None:
    """The module that registers command ``name``; None for a name that is no command."""
    return next((c.module for c in COMMANDS if c.name == name), None)

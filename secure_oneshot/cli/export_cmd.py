"""``secure-oneshot export`` (site) and ``secure-oneshot ingest`` (server).

Each command imports its own side's module when it runs (the site's export
pipeline is not loaded to ingest, nor the server's ingest to export).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..bundle.recipients import check_recipients
from .._internal.termsafe import printable, shorten
from ..errors import QuarantinedBundlesError
from ..keys import format_key_id, load_public, load_trust_store
from ..policy.explain import decision_table, evaluation_json, metadata_table
from ..policy.load import load_ingest_policy
from ..policy.model import ARTIFACTS
from ..policy.privacy_statement import summary_lines
from .keys_cmd import add_trust_option, trust_path
from .output import Result, byte_size
from .secrets import add_passphrase_option, load_private_identity

if TYPE_CHECKING:
    from ..server.ingest import BundleOutcome

__all__ = ["register"]


def _export(args: argparse.Namespace) -> Result:
    from ..client.export import ExportRequest, export_model

    sender = load_private_identity(args.key, args.passphrase_env)
    recipients = check_recipients([load_public(p) for p in args.to])  # refused before the model is read
    request = ExportRequest(
        model_dir=Path(args.model), policy_path=Path(args.policy), sender=sender, recipients=recipients,
        out=Path(args.out), audit_log=Path(args.audit), trust=load_trust_store(trust_path(args)),
        without=frozenset(args.without or []), min_approvals=args.min_approvals, dry_run=args.dry_run,
        privacy_audit=Path(args.privacy_audit) if args.privacy_audit else None,
    )
    report = export_model(request)
    ev = report.evaluation
    eps = ", ".join(f"{a} epsilon {e:.3g}" for a, e in sorted(report.epsilons.items())) or "no DP claims"
    lines = [
        f"{'DRY RUN: would send' if args.dry_run else 'SENT'} {len(report.tensors)} tensors, {byte_size(ev.payload_bytes)}; {eps}",
        f"  policy    {report.policy.id} v{report.policy.version} (sha256 {report.policy.sha256[:16]}...)",
        *(f"  to        {r.name} ({format_key_id(r.key_id)})" for r in recipients),
    ]
    data = {"dry_run": args.dry_run, "tensors": report.tensors, **evaluation_json(ev)}
    if report.bundle is not None:
        m = report.bundle.manifest
        lines += [f"  bundle    {report.bundle.path} (id {m.bundle_id})", f"  sha256    {m.payload_sha256}", f"  expires   {m.expires}",
                  f"  audit     recorded in {args.audit}"]
        data.update({"bundle": str(report.bundle.path), "bundle_id": m.bundle_id, "payload_sha256": m.payload_sha256, "expires": m.expires})
    if report.statement is not None:
        lines += summary_lines(report.statement)
        data["privacy_statement"] = report.statement
    if args.dry_run or args.explain:
        lines += metadata_table(ev)  # exactly which model-record fields would leave
    if args.explain:
        lines += ["decisions:", *decision_table(ev.decisions)]
    return Result(data, lines)


SHOWN_NAME_CHARS, SHOWN_REASON_CHARS = 80, 300  # table columns; the full (escaped) text is in --json and the reason files


def _ingest_line(o: BundleOutcome) -> str:
    """One table row.  Outcome fields are already escaped (termsafe.printable); here they are only cut to length."""
    line = f"  {o.outcome:12s} {shorten(o.file, SHOWN_NAME_CHARS)}"
    if o.error:
        line += f"  {o.error}: {shorten(o.reason, SHOWN_REASON_CHARS)}"
    if o.reason_file:
        line += f"  [{o.reason_file}]"
    if o.left_in_inbox:
        line += "  (left in the inbox)"
    if o.privacy_summary:
        line += f"  privacy: {o.privacy_summary}"
    return line


def _ingest(args: argparse.Namespace) -> Result:
    from ..server.ingest import IngestFolders, ingest_inbox

    identity = load_private_identity(args.key, args.passphrase_env)
    policy = load_ingest_policy(args.policy)
    folders = IngestFolders.under(Path(args.server_dir), Path(args.inbox) if args.inbox else None)
    outcomes = ingest_inbox(folders, identity, load_trust_store(trust_path(args)), policy, wait=args.wait)
    quarantined = sum(o.outcome == "quarantined" for o in outcomes)
    lines = [f"{len(outcomes)} bundle(s) in {printable(str(folders.inbox))}: {len(outcomes) - quarantined} accepted, {quarantined} quarantined"]
    lines += [_ingest_line(o) for o in outcomes]
    data = {"outcomes": [o.__dict__ for o in outcomes], "accepted_dir": str(folders.accepted), "quarantine_dir": str(folders.quarantine),
            "quarantined": quarantined}
    return Result(data, lines, exit_code=QuarantinedBundlesError.exit_code if quarantined else 0)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    export = commands.add_parser("export", help="policy-checked, signed, encrypted, audited export of a trained model", parents=[common])
    export.add_argument("--model", required=True, metavar="DIR", help="trained model directory (record.json + safetensors)")
    export.add_argument("--policy", required=True, metavar="POLICY.toml", help="the site export policy (signatures in POLICY.toml.sig)")
    export.add_argument("--key", required=True, metavar="FILE.key", help="the site's private key")
    export.add_argument("--to", required=True, action="append", metavar="FILE.pub", help="recipient public identity (repeatable)")
    export.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write")
    export.add_argument("--audit", default="audit.jsonl", metavar="LOG", help="the site's audit log (default audit.jsonl)")
    export.add_argument("--without", action="append", choices=ARTIFACTS, help="leave this artifact out (e.g. bn_statistics)")
    export.add_argument("--min-approvals", type=int, default=0, metavar="N",
                        help="the site's floor for approver signatures on the policy, whatever the policy says (default 0)")
    export.add_argument("--privacy-audit", metavar="REPORT.json",
                        help="the audit-privacy JSON report to state (default: MODEL/privacy_audit.json when present)")
    export.add_argument("--dry-run", action="store_true", help="evaluate everything, write nothing")
    export.add_argument("--explain", action="store_true", help="also print the full decision table")
    add_trust_option(export)
    add_passphrase_option(export)
    export.set_defaults(handler=_export)

    ingest = commands.add_parser(
        "ingest", help="verify an inbox of bundles; accept or quarantine each", parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify every *.sob entry of the inbox once; store exactly the verified bytes in accepted/, or set the entry\n"
                    "aside in quarantine/ under a generated name with a .reason.json (symlinks and special files are moved, never\n"
                    "opened). One bad entry never stops the run.",
        epilog="exit status: 0 all accepted (or nothing to do); 16 finished, some entries quarantined;\n"
               "9 another ingest or a distill holds the server folder (see --wait); other codes: secure-oneshot --help")
    ingest.add_argument("--server-dir", required=True, metavar="DIR", help="holds inbox/, accepted/, quarantine/, ledger.db, audit.jsonl")
    ingest.add_argument("--inbox", metavar="DIR", help="inbox folder (default SERVER_DIR/inbox)")
    ingest.add_argument("--policy", required=True, metavar="POLICY.toml", help="the server ingest policy")
    ingest.add_argument("--key", required=True, metavar="FILE.key", help="the server's private key")
    ingest.add_argument("--wait", action="store_true", help="wait for a running ingest or distill on SERVER_DIR instead of exiting with status 9")
    add_trust_option(ingest)
    add_passphrase_option(ingest)
    ingest.set_defaults(handler=_ingest)

"""``secure-oneshot policy check | explain | sign | verify``: policies for compliance reviewers."""

from __future__ import annotations

import argparse
from pathlib import Path

from .._internal.encoding import utc_now
from ..errors import PolicyViolationError
from ..keys import load_trust_store
from ..policy.load import load_export_policy, load_policy
from ..policy.model import ExportPolicy
from ..policy.signatures import count_approvals, sign_policy
from .keys_cmd import add_trust_option, trust_path
from .output import Result
from .secrets import add_passphrase_option, load_private_identity

__all__ = ["register"]


def _summary(policy) -> list[str]:  # type: ignore[no-untyped-def]
    kind = "site export" if isinstance(policy, ExportPolicy) else "server ingest"
    lines = [f"valid {kind} policy {policy.id} v{policy.version} (owner: {policy.owner})", f"sha256 {policy.sha256}"]
    if isinstance(policy, ExportPolicy):
        lines += [f"  in force {policy.effective:%Y-%m-%d} .. {policy.expires:%Y-%m-%d}",
                  "  artifacts: " + ", ".join(f"{a}={m}" for a, m in policy.artifacts.items()),
                  f"  recipients: {len(policy.recipients)}; tensor rules: {len(policy.tensors)}; approvals required: {policy.approvals_required}",
                  _statement_rules(policy)]
    return lines


def _statement_rules(policy: ExportPolicy) -> str:
    r = policy.privacy_statement
    k = r.max_images_per_patient
    return (f"  privacy statement: audit {'required' if r.require_privacy_audit else 'not required'}; "
            f"max composed epsilon (with earlier releases) {r.max_composed_epsilon if r.max_composed_epsilon is not None else 'none'}; "
            f"images per patient {k if k else 'not declared (no patient-level guarantee)'}; "
            f"record count {'shared' if r.share_record_count else 'withheld'}; utility {'shared' if r.share_utility else 'withheld'}")


def _check(args: argparse.Namespace) -> Result:
    policy = load_policy(args.file)
    return Result({"policy_id": policy.id, "version": policy.version, "sha256": policy.sha256, "kind": type(policy).__name__}, _summary(policy))


def _explain(args: argparse.Namespace) -> Result:
    # Reading tensors and judging them needs NumPy; check, sign and verify read only the policy.
    from ..policy.artifacts import load_model_dir
    from ..policy.evaluate import ExportContext, evaluate_export
    from ..policy.explain import decision_table, evaluation_json, metadata_table

    policy = load_export_policy(args.policy)
    trust = load_trust_store(trust_path(args)) if Path(trust_path(args)).exists() else None
    approvals = count_approvals(policy, args.policy, trust, utc_now())[0] if trust else 0
    candidate = load_model_dir(args.model).without(set(args.without or []))
    ev = evaluate_export(policy, candidate, ExportContext(utc_now(), tuple(args.recipient or policy.recipients), approvals, None))
    verdict = "everything listed would be ALLOWED" if ev.allowed else f"{len(ev.denied)} decision(s) DENY: export would be refused"
    lines = [f"policy {policy.id} v{policy.version} on {args.model}: {verdict}", _statement_rules(policy).strip(),
             *decision_table(ev.decisions), *metadata_table(ev)]
    return Result({"policy_id": policy.id, "version": policy.version, **evaluation_json(ev)}, lines)


def _sign(args: argparse.Namespace) -> Result:
    policy = load_policy(args.file)
    approver = load_private_identity(args.key, args.passphrase_env)
    path = sign_policy(policy, args.file, approver)
    return Result({"signatures": str(path), "key_id": approver.key_id, "policy_sha256": policy.sha256},
                  [f"{approver.name} signed {policy.id} v{policy.version} (sha256 {policy.sha256[:16]}...) in {path}"])


def _verify(args: argparse.Namespace) -> Result:
    policy = load_export_policy(args.file)
    count, checked = count_approvals(policy, args.file, load_trust_store(trust_path(args)))
    lines = [f"{'OK' if count >= policy.approvals_required else 'NOT ENOUGH'}: {count} of {policy.approvals_required} required approvals"]
    lines += [f"  {'valid  ' if a.valid else 'INVALID'} {a.name or '?'} ({a.key_id}) {a.signed_at}: {a.reason}" for a in checked]
    data = {"valid": count, "required": policy.approvals_required, "signatures": [a.__dict__ for a in checked]}
    if count < policy.approvals_required:
        raise PolicyViolationError(f"policy {policy.id} has {count} valid approval(s), {policy.approvals_required} required",
                                   hint="ask the listed approvers to run `secure-oneshot policy sign`", details=lines[1:], data=data)
    return Result(data, lines)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    policy = commands.add_parser("policy", help="check, explain, sign and verify policy files", parents=[common])
    sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a policy file (every problem, with file:line)", parents=[common])
    check.add_argument("file")
    check.set_defaults(handler=_check)
    explain = sub.add_parser("explain", help="the per-tensor, per-rule decision table for a model directory", parents=[common])
    explain.add_argument("--policy", required=True)
    explain.add_argument("--model", required=True, metavar="DIR")
    explain.add_argument("--recipient", action="append", metavar="KEY_ID", help="judge these recipients (default: the policy's)")
    explain.add_argument("--without", action="append", metavar="ARTIFACT", help="leave an artifact out, as export --without does")
    add_trust_option(explain)
    explain.set_defaults(handler=_explain)
    sign = sub.add_parser("sign", help="add your approver signature to POLICY.sig", parents=[common])
    sign.add_argument("file")
    sign.add_argument("--key", required=True, metavar="FILE.key", help="the approver's private key")
    add_passphrase_option(sign)
    sign.set_defaults(handler=_sign)
    verify = sub.add_parser("verify", help="check the k-of-n approver signatures", parents=[common])
    verify.add_argument("file")
    add_trust_option(verify)
    verify.set_defaults(handler=_verify)

"""``secure-oneshot seal | inspect | verify | open``: the low-level bundle commands.

``seal`` takes a safetensors file as it is; the policy-checked ``export`` that
hospital IT runs builds on the same API.
"""

from __future__ import annotations

import argparse
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..bundle.format import Header
from ..bundle.inspect import inspect_bundle
from ..bundle.recipients import check_recipients
from ..bundle.format import MAX_PAYLOAD_SIZE
from ..bundle.safetensors_strict import PayloadLimits
from ..bundle.verify import DEFAULT_MAX_PAYLOAD_BYTES, OpenedBundle, VerifiedBundle, VerifyOptions, open_bundle, verify_bundle
from ..errors import ReplayError, ResourceError
from ..keys import format_key_id, load_public, load_trust_store
from .keys_cmd import add_trust_option, trust_path
from .output import Result, byte_size, progress_bar
from .secrets import add_passphrase_option, load_private_identity

__all__ = ["register"]


def _header_data(header: Header) -> dict[str, Any]:
    return {
        "format": "secure-oneshot/v1",
        "bundle_id": header.bundle_id,
        "sender": header.sender,
        "recipients": list(header.recipient_ids),
        "created": header.created,
        "expires": header.expires,
        "policy_id": header.policy_id,
        "payload_size": header.payload_size,
        "chunk_size": header.chunk_size,
    }


def _header_lines(header: Header) -> list[str]:
    return [
        f"bundle     {header.bundle_id}",
        f"sender     {format_key_id(header.sender)}",
        *(f"recipient  {format_key_id(r)}" for r in header.recipient_ids),
        f"created    {header.created}",
        f"expires    {header.expires}",
        f"policy     {header.policy_id or '(none)'}",
        f"payload    {byte_size(header.payload_size)} ({header.payload_size} bytes)",
    ]


def _input_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise ResourceError(f"cannot read {path}: {e.strerror}", hint="check the path of the safetensors file") from e


def _valid_days(text: str) -> float:
    """argparse type: a finite number of days between one minute and ten years."""
    try:
        days = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if not math.isfinite(days) or not 1 / 1440 <= days <= 3650:
        raise argparse.ArgumentTypeError(f"{text} must be between 1 minute (0.0007) and 3650 days")
    return days


def _seal(args: argparse.Namespace) -> Result:
    from ..bundle.seal import seal_safetensors_file   # here: the other commands never load the writer

    sender = load_private_identity(args.key, args.passphrase_env)
    recipients = check_recipients([load_public(path) for path in args.to])
    if args.trust or args.check_recipients:
        store = load_trust_store(trust_path(args))
        recipients = [store.require(r.key_id, "recipient") for r in recipients]
    with progress_bar("sealing", _input_size(args.input)) as progress:
        result = seal_safetensors_file(
            args.input, args.out, sender=sender, recipients=recipients,
            policy_id=args.policy_id, valid_for=timedelta(days=args.valid_days), progress=progress,
        )
    lines = [f"sealed {args.input} -> {result.path}", *_header_lines(result.header), f"sha256     {result.manifest.payload_sha256}"]
    return Result({"bundle": str(result.path), "header": _header_data(result.header), "payload_sha256": result.manifest.payload_sha256}, lines)


def _inspect(args: argparse.Namespace) -> Result:
    header = inspect_bundle(args.bundle)
    lines = [*_header_lines(header), "(the site's privacy statement is signed and encrypted inside the bundle: `secure-oneshot verify` shows it)",
             "(public header only: nothing is verified until `secure-oneshot verify`)"]
    return Result({"header": _header_data(header), "verified": False}, lines)


def _options(args: argparse.Namespace) -> VerifyOptions:
    return VerifyOptions(max_payload_bytes=args.max_bytes, limits=PayloadLimits(reject_nonfinite=not args.allow_nonfinite))


def _open_verified(args: argparse.Namespace, out: str) -> OpenedBundle:
    """Verify and publish the payload at ``out`` once verified, holding a few chunks in memory, not the payload."""
    identity = load_private_identity(args.key, args.passphrase_env)
    store = load_trust_store(trust_path(args))
    with progress_bar("verifying", inspect_bundle(args.bundle).payload_size) as progress:
        return open_bundle(args.bundle, identity, store, options=_options(args), progress=progress, out=out)


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
"""safetensors dtype code -> the element type's name as NumPy (and torch, for bfloat16) spell it."""


def _content(bundle: OpenedBundle | VerifiedBundle) -> tuple[dict[str, Any], list[str]]:
    if isinstance(bundle, VerifiedBundle):
        specs = bundle.tensor_specs
    else:
        from ..bundle.arrays import dtype_code   # imported here only: inspect stays without NumPy

        specs = {name: (dtype_code(t), tuple(t.shape)) for name, t in bundle.tensors.items()}
    tensors = {name: {"dtype": _DTYPE_NAMES[code], "shape": list(shape)} for name, (code, shape) in specs.items()}
    data = {
        "header": _header_data(bundle.header),
        "sender_name": bundle.sender.name,
        "payload_sha256": bundle.manifest.payload_sha256,
        "policy_sha256": bundle.manifest.policy_sha256,
        "dp": bundle.manifest.dp,
        "meta": bundle.manifest.meta,
        "tensors": tensors,
        "verified": True,
    }
    lines = [
        f"VERIFIED bundle {bundle.header.bundle_id} from {bundle.sender.name} ({format_key_id(bundle.sender.key_id)})",
        *_header_lines(bundle.header)[1:],
        f"sha256     {bundle.manifest.payload_sha256}",
        f"tensors    {len(tensors)}",
        *(f"  {name}  {t['dtype']}  {tuple(t['shape'])}" for name, t in list(tensors.items())[:20]),
    ]
    if len(tensors) > 20:
        lines.append(f"  ... and {len(tensors) - 20} more (use --json for all)")
    statement = bundle.manifest.meta.get("privacy_statement") if isinstance(bundle.manifest.meta, dict) else None
    if statement is not None:
        from ..policy.privacy_statement import parse_statement, public_summary, summary_lines

        parse_statement(statement)   # shown only once it parses: a malformed one is an error, not a half-printed table
        data["privacy_statement"] = public_summary(statement)
        lines += summary_lines(statement)
    return data, lines


def _ledger(path: str | None, *, read_only: bool) -> Any:
    """The replay ledger at ``path`` (None without one); SQLite is imported only when a ledger is used."""
    if not path:
        return None
    from ..bundle.ledger import ReplayLedger

    return ReplayLedger.read_only(path) if read_only else ReplayLedger(path)


def _verify(args: argparse.Namespace) -> Result:
    # verify writes nothing (not even the payload to a temporary file): the ledger, when given, is only read.
    ledger = _ledger(args.ledger, read_only=True)
    if ledger is not None:
        ledger.check(inspect_bundle(args.bundle).bundle_id)
    identity = load_private_identity(args.key, args.passphrase_env)
    store = load_trust_store(trust_path(args))
    with progress_bar("verifying", inspect_bundle(args.bundle).payload_size) as progress:
        verified = verify_bundle(args.bundle, identity, store, options=_options(args), progress=progress)
    data, lines = _content(verified)
    return Result(data, lines)


def _open(args: argparse.Namespace) -> Result:
    if args.out == "-":
        raise ResourceError("refusing to write decrypted tensors to standard output", hint="pass --out FILE.safetensors (written atomically, mode 0600)")
    ledger = _ledger(args.ledger, read_only=False)
    if ledger is not None:
        ledger.check(inspect_bundle(args.bundle).bundle_id)
    opened = _open_verified(args, args.out)
    path = Path(args.out)
    if ledger is not None:
        # Recorded only once the payload is safely on disk, so a failed write can be retried.
        try:
            opened.record_in(ledger)
        except ReplayError:
            path.unlink(missing_ok=True)  # a concurrent open won the race
            raise
    data, lines = _content(opened)
    return Result({**data, "out": str(path)}, [*lines, f"wrote {path} (mode 0600)"])


def _byte_count(text: str) -> int:
    """argparse type: a payload limit in bytes, 1 .. the format's 64 GiB maximum."""
    try:
        value = int(text.replace("_", ""))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from e
    if not 1 <= value <= MAX_PAYLOAD_SIZE:
        raise argparse.ArgumentTypeError(f"{text} must be between 1 and {MAX_PAYLOAD_SIZE} (64 GiB)")
    return value


def _add_recipient_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--max-bytes", type=_byte_count, default=DEFAULT_MAX_PAYLOAD_BYTES, metavar="N",
                        help=f"refuse payloads over N bytes before reading them (default {DEFAULT_MAX_PAYLOAD_BYTES}, 2 GiB)")
    parser.add_argument("--key", required=True, metavar="FILE.key", help="your (recipient) private key file")
    parser.add_argument("--ledger", metavar="DB", help="replay ledger (SQLite) of accepted bundle ids")
    parser.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf tensor values")
    add_trust_option(parser)
    add_passphrase_option(parser)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    seal = commands.add_parser("seal", help="sign and encrypt a safetensors file into a bundle (low level; see export)", parents=[common])
    seal.add_argument("input", metavar="INPUT.safetensors")
    seal.add_argument("--key", required=True, metavar="FILE.key", help="the sending site's private key file")
    seal.add_argument("--to", required=True, action="append", metavar="FILE.pub", help="a recipient's public identity (repeatable)")
    seal.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write (atomically)")
    seal.add_argument("--valid-days", type=_valid_days, default=7.0, help="days until the bundle expires (default 7, at most 3650)")
    seal.add_argument("--policy-id", default="", help="export policy id to bind into the bundle")
    seal.add_argument("--check-recipients", action="store_true", help="require every recipient to be trusted as recipient")
    add_trust_option(seal)
    add_passphrase_option(seal)
    seal.set_defaults(handler=_seal)

    inspect = commands.add_parser("inspect", help="print a bundle's public header (no key needed, nothing verified)", parents=[common])
    inspect.add_argument("bundle")
    inspect.set_defaults(handler=_inspect)

    verify = commands.add_parser("verify", help="fully verify a bundle with your key; writes nothing", parents=[common])
    _add_recipient_options(verify)
    verify.set_defaults(handler=_verify)

    opener = commands.add_parser("open", help="verify a bundle and write its safetensors payload (mode 0600)", parents=[common])
    _add_recipient_options(opener)
    opener.add_argument("--out", required=True, metavar="FILE.safetensors", help="where to write the verified payload")
    opener.set_defaults(handler=_open)

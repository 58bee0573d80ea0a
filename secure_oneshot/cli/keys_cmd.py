"""``secure-oneshot keys ...``: create identities, show them, manage the trust store."""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone

from ..errors import ConfigError
from ..keys import (
    ROLES,
    Identity,
    PublicIdentity,
    TrustEntry,
    TrustStore,
    format_key_id,
    load_public,
    load_trust_store,
    save_identity,
    save_trust_store,
)
from .._internal.encoding import format_time
from .output import Result
from .secrets import add_passphrase_option, read_passphrase

__all__ = ["register", "add_trust_option", "trust_path"]


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust", metavar="FILE", default=None,
        help=f"trust store (default $SECURE_ONESHOT_TRUST or {os.path.join('keys', 'trust.toml')})",
    )


def trust_path(args: argparse.Namespace) -> str:
    return args.trust or os.environ.get("SECURE_ONESHOT_TRUST", os.path.join("keys", "trust.toml"))


def _identity_data(public: PublicIdentity) -> dict[str, str]:
    return {**public.public_fields(), "fingerprint": format_key_id(public.key_id)}


def _new(args: argparse.Namespace) -> Result:
    identity = Identity.generate(args.name)
    if args.insecure_no_passphrase:
        passphrase = None
    else:
        passphrase = read_passphrase(args.passphrase_env, f"New passphrase for {args.name}: ", confirm=True)
    private_path, public_path = save_identity(identity, args.out, passphrase, overwrite=args.force)
    data = {**_identity_data(identity.public), "private_key_file": str(private_path), "public_key_file": str(public_path),
            "passphrase_protected": passphrase is not None}
    lines = [
        f"created identity {identity.name}",
        f"  key id:      {format_key_id(identity.key_id)}",
        f"  public file: {public_path}   (share it; confirm the key id by phone)",
        f"  private key: {private_path}   (mode 0600; keep it secret, never commit it)",
    ]
    if passphrase is None:
        lines.append("  WARNING: the private key is NOT passphrase-protected (--insecure-no-passphrase)")
    return Result(data, lines)


def _show(args: argparse.Namespace) -> Result:
    public = load_public(args.file)
    data = _identity_data(public)
    return Result(data, [f"{k:15s} {v}" for k, v in data.items()])


def _fingerprint(args: argparse.Namespace) -> Result:
    public = load_public(args.file)
    return Result({"key_id": public.key_id, "fingerprint": format_key_id(public.key_id)}, [format_key_id(public.key_id)])


def _load_or_empty(path: str) -> TrustStore:
    return load_trust_store(path) if os.path.exists(path) else TrustStore()


def _parse_expiry(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as e:
        raise ConfigError(f"--expires {text!r} is not a date", hint="use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ") from e
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _trust_add(args: argparse.Namespace) -> Result:
    path = trust_path(args)
    public = load_public(args.file)
    entry = TrustEntry(public, frozenset(args.role), _parse_expiry(args.expires), args.note or "")
    save_trust_store(_load_or_empty(path).with_entry(entry), path)
    until = f" until {format_time(entry.expires)}" if entry.expires else ""
    return Result(
        {"store": path, "added": _identity_data(public), "roles": sorted(entry.roles), "expires": entry.expires and format_time(entry.expires)},
        [f"trusted {public.name} ({format_key_id(public.key_id)}) as {', '.join(sorted(entry.roles))}{until} in {path}"],
    )


def _trust_revoke(args: argparse.Namespace) -> Result:
    path = trust_path(args)
    try:
        store = _load_or_empty(path).with_revocation(args.key_id.replace(" ", ""), args.reason)
    except ValueError as e:
        raise ConfigError(str(e), hint="give the 32-digit key id shown by `keys fingerprint`") from e
    save_trust_store(store, path)
    return Result({"store": path, "revoked": args.key_id, "reason": args.reason}, [f"revoked {args.key_id} in {path}: {args.reason}"])


def _trust_list(args: argparse.Namespace) -> Result:
    path = trust_path(args)
    store = load_trust_store(path)
    entries = [
        {**_identity_data(e.identity), "roles": sorted(e.roles), "expires": e.expires and format_time(e.expires), "note": e.note}
        for e in store.entries
    ]
    revoked = [{"key_id": r.key_id, "reason": r.reason, "revoked_at": format_time(r.revoked_at)} for r in store.revocations]
    lines = [f"trust store {path}"]
    lines += [f"  {e['name']:20s} {e['fingerprint']}  {','.join(e['roles']):17s} expires {e['expires'] or 'never'}" for e in entries]
    lines += [f"  REVOKED {r['key_id']} on {r['revoked_at']}: {r['reason']}" for r in revoked]
    return Result({"store": path, "identities": entries, "revoked": revoked}, lines)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    keys = commands.add_parser("keys", help="create and show identities; manage the trust store", parents=[common])
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    new = sub.add_parser("new", help="create an identity (Ed25519 signing + X25519 encryption key)", parents=[common])
    new.add_argument("--name", required=True, help="identity name, e.g. st-marys or server")
    new.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.key (0600) and NAME.pub")
    new.add_argument("--force", action="store_true", help="replace existing files")
    new.add_argument("--insecure-no-passphrase", action="store_true", help="store the private key UNENCRYPTED (tests and demos only)")
    add_passphrase_option(new)
    new.set_defaults(handler=_new)

    show = sub.add_parser("show", help="print a public identity (from a .pub or .key file; never prints secrets)", parents=[common])
    show.add_argument("file")
    show.set_defaults(handler=_show)

    fingerprint = sub.add_parser("fingerprint", help="print the key id, grouped for reading aloud", parents=[common])
    fingerprint.add_argument("file")
    fingerprint.set_defaults(handler=_fingerprint)

    trust = sub.add_parser("trust", help="add, revoke and list trusted identities", parents=[common])
    trust_sub = trust.add_subparsers(dest="trust_command", metavar="ACTION", required=True)
    add = trust_sub.add_parser("add", help="trust a public identity as sender and/or recipient", parents=[common])
    add.add_argument("file", help="the identity's .pub file")
    add.add_argument("--role", action="append", choices=ROLES, required=True, help="repeat for both roles")
    add.add_argument("--expires", help="stop trusting it after this date (YYYY-MM-DD or RFC 3339)")
    add.add_argument("--note", help="why it is trusted, e.g. 'key id confirmed by phone with J. Doe'")
    add_trust_option(add)
    add.set_defaults(handler=_trust_add)
    revoke = trust_sub.add_parser("revoke", help="never accept a key id again", parents=[common])
    revoke.add_argument("key_id")
    revoke.add_argument("--reason", required=True)
    add_trust_option(revoke)
    revoke.set_defaults(handler=_trust_revoke)
    listing = trust_sub.add_parser("list", help="show the trust store", parents=[common])
    add_trust_option(listing)
    listing.set_defaults(handler=_trust_list)

"""The ``secure-oneshot`` command line: parse arguments, call the API, render output.

The only place that exits.  Every expected failure is a
:class:`~secure_oneshot.errors.SecureOneshotError`, printed as one line
``secure-oneshot: error: ...`` plus ``hint: ...`` with its own exit code (README,
EXIT STATUS); ``-v`` adds the traceback.  ``--json`` prints the same result (or
error) object as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from collections.abc import Sequence

from .. import __version__
from ..errors import EXIT_CODES, SecureOneshotError
from . import audit_cmd, bundle_cmd, distill_cmd, export_cmd, keys_cmd, policy_cmd, research_cmd, train_cmd
from .output import Result

__all__ = ["main", "build_parser"]

PROG = "secure-oneshot"


def _epilog() -> str:
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in sorted(EXIT_CODES.items()))


def _common_options(default: object) -> argparse.ArgumentParser:
    """``-v`` and ``--json``, accepted before or after the subcommand.

    Subcommands get ``default=SUPPRESS`` so that they do not reset a flag given
    before the subcommand name.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=default, help="show tracebacks for errors")
    common.add_argument("--json", action="store_true", default=default, help="print the result (or error) as JSON on stdout")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="One-shot federated learning on medical images: signed, encrypted, policy-checked weight bundles.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(False)],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options(argparse.SUPPRESS)
    keys_cmd.register(commands, common)
    bundle_cmd.register(commands, common)
    policy_cmd.register(commands, common)
    export_cmd.register(commands, common)
    audit_cmd.register(commands, common)
    train_cmd.register(commands, common)
    distill_cmd.register(commands, common)
    research_cmd.register(commands, common)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _report_error(error: SecureOneshotError, as_json: bool, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{PROG}: error: {error.message}", file=sys.stderr)
    if error.hint:
        print(f"hint: {error.hint}", file=sys.stderr)
    for line in error.details:
        print(line, file=sys.stderr)
    if as_json:
        payload = {"ok": False, "error": {"type": type(error).__name__, "message": error.message, "hint": error.hint, "exit_code": error.exit_code, **error.data}}
        print(json.dumps(payload, indent=2))
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        result: Result = args.handler(args)
    except SecureOneshotError as error:
        return _report_error(error, args.json, args.verbose)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    result.print(as_json=args.json)
    return result.exit_code


def entry_point() -> None:
    sys.exit(main())

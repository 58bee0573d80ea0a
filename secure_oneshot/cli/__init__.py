"""The ``secure-oneshot`` command line: parse arguments, call the API, render output.

The only place that exits.  Every expected failure is a
:class:`~secure_oneshot.errors.SecureOneshotError`, printed as one line
``secure-oneshot: error: ...`` plus ``hint: ...`` with its own exit code (README,
EXIT STATUS); ``-v`` adds the traceback.  ``--json`` prints the same result (or
error) object as JSON on stdout.

Sub-commands come from the table in :mod:`.commands`; a command's module (and
so its dependencies) is imported only when that command runs, so the transfer
path (keys, policies, bundles, audit logs) never loads an ML library.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence

from .. import __version__
from ..errors import EXIT_CODES, SecureOneshotError
from .commands import COMMANDS, module_of
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every command fully when ``command`` is None, else only ``command``'s module fully.

    The other commands are listed (name and help, from :data:`.commands.COMMANDS`)
    without importing their modules.
    """
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
    wanted = module_of(command) if command is not None else None
    registered: set[str] = set()
    for entry in COMMANDS:
        if command is None or entry.module == wanted:
            if entry.module not in registered:
                importlib.import_module(f"{__name__}.{entry.module}").register(commands, common)
                registered.add(entry.module)
        else:
            commands.add_parser(entry.name, help=entry.help, add_help=False)
    return parser


def _command_name(argv: Sequence[str]) -> str | None:
    """The sub-command named in ``argv``: the first argument that is not an option (top-level options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _report_error(error: SecureOneshotError, as_json: bool, verbose: bool) -> int:
    if verbose:
        import traceback   # only for -v: not every command's start-up

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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_name(argv) or "")
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

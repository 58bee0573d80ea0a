"""Getting passphrases and private identities for the CLI, without ever echoing them."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from ..errors import PassphraseError
from ..keys import Identity, load_identity

__all__ = ["DEFAULT_PASSPHRASE_ENV", "add_passphrase_option", "read_passphrase", "load_private_identity"]

DEFAULT_PASSPHRASE_ENV = "SECURE_ONESHOT_PASSPHRASE"


def add_passphrase_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        default=DEFAULT_PASSPHRASE_ENV,
        help=f"read the key passphrase from this environment variable (default {DEFAULT_PASSPHRASE_ENV}); otherwise prompt",
    )


def read_passphrase(env_var: str, prompt: str, confirm: bool = False) -> bytes:
    """From ``env_var`` if set, else from a terminal prompt (twice when ``confirm``).

    Raises:
        PassphraseError: no terminal and no variable, or the two entries differ.
    """
    value = os.environ.get(env_var)
    if value is not None:
        return value.encode("utf-8")
    if not sys.stdin.isatty():
        raise PassphraseError(
            f"a passphrase is needed but there is no terminal and ${env_var} is not set",
            hint=f"set {env_var} (or name another variable with --passphrase-env) for automation",
        )
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise PassphraseError("the two passphrases differ", hint="run the command again")
    return first.encode("utf-8")


def load_private_identity(path: str, env_var: str) -> Identity:
    """Load a private key file, asking for its passphrase only if it has one.

    The file is read once: its mode and fields are checked before any prompt, and
    the bytes that were checked are the bytes that are decrypted.
    """
    return load_identity(path, lambda: read_passphrase(env_var, f"Passphrase for {path}: "))

"""The exception tree and exit codes of secure-oneshot.

Every *expected* failure (bad input, a refused bundle, a wrong passphrase) is a
subclass of :class:`SecureOneshotError` carrying an ``exit_code`` and a ``hint``
that tells the user what to do.  ``secure_oneshot.cli.main`` catches the root in
one place and prints ``secure-oneshot: error: ...`` plus ``hint: ...``.  Caller
bugs stay builtin exceptions (``TypeError``, ``ValueError``) and surface as
tracebacks with exit code 1, because they are bugs.

Messages never contain private key material or passphrases.
"""

from __future__ import annotations

__all__ = [
    "SecureOneshotError",
    "ConfigError",
    "KeyMaterialError",
    "PassphraseError",
    "NotARecipientError",
    "BundleFormatError",
    "BundleAuthError",
    "PolicyViolationError",
    "PrivacyError",
    "ResourceError",
    "TrustError",
    "ReplayError",
    "FreshnessError",
    "TensorPayloadError",
    "AuditLogError",
    "DataError",
    "QuarantinedBundlesError",
    "EvidenceError",
    "EXIT_CODES",
]


class SecureOneshotError(Exception):
    """Root of every expected failure.

    Args:
        message: one line saying what failed and what it means.
        hint: what the user can do about it (optional, one line).
        details: further lines for people, such as a policy decision table.
        data: the same details as JSON-able data for ``--json``.
    """

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None, *, details: list[str] | None = None, data: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.details = details or []  # extra lines for people (e.g. a decision table), printed after the hint
        self.data = data or {}  # the same facts for --json


class ConfigError(SecureOneshotError):
    """A config, policy or trust-store file is invalid."""

    exit_code = 3
    default_hint = "fix the file named above; unknown keys and wrong types are errors"


class KeyMaterialError(SecureOneshotError):
    """A key file is missing, malformed or of the wrong kind."""

    exit_code = 4
    default_hint = "check the key file path; create identities with `secure-oneshot keys new`"


class PassphraseError(KeyMaterialError):
    """The passphrase does not open the private key file (or none was given)."""

    default_hint = "check the passphrase (prompt, or the environment variable named by --passphrase-env)"


class NotARecipientError(KeyMaterialError):
    """The bundle was not encrypted to the identity that tried to open it."""

    default_hint = "open it with the identity named in the bundle's recipients (see `secure-oneshot inspect`)"


class BundleFormatError(SecureOneshotError):
    """The bundle is malformed, too big, or of an unknown version."""

    exit_code = 5
    default_hint = "the file is not a secure-oneshot/v1 bundle or is damaged; ask the sender to export it again"


class BundleAuthError(SecureOneshotError):
    """A signature, MAC or decryption check failed: the bundle may have been tampered with."""

    exit_code = 6
    default_hint = "do not use this bundle; ask the sender to export it again over a fresh channel"


class PolicyViolationError(SecureOneshotError):
    """A policy forbids this action."""

    exit_code = 7
    default_hint = "run `secure-oneshot policy explain` to see which rule denied it"


class PrivacyError(SecureOneshotError):
    """A differential-privacy requirement is unmet or a budget is exceeded."""

    exit_code = 8
    default_hint = "train with a smaller epsilon or ask the privacy office to review the budget"


class ResourceError(SecureOneshotError):
    """A GPU, disk or other resource is unavailable."""

    exit_code = 9
    default_hint = "free the resource or choose another device/output folder"


class TrustError(SecureOneshotError):
    """The sender (or a recipient) is not trusted: unknown, revoked, expired or lacking the role."""

    exit_code = 10
    default_hint = "add the identity to the trust store with `secure-oneshot keys trust add` after checking its key id"


class ReplayError(SecureOneshotError):
    """A bundle with this id was already accepted once."""

    exit_code = 11
    default_hint = "each bundle is accepted once; ask the sender for a fresh export if this is intentional"


class FreshnessError(SecureOneshotError):
    """The bundle has expired, or is dated in the future beyond the allowed clock skew."""

    exit_code = 12
    default_hint = "ask the sender for a fresh export and check both machines' clocks"


class TensorPayloadError(SecureOneshotError):
    """The (authenticated) safetensors payload breaks the strict parsing rules."""

    exit_code = 13
    default_hint = "the sender's payload is unsafe or malformed; report it to the sending site"


class AuditLogError(SecureOneshotError):
    """The audit log is damaged, or a record was edited, deleted, inserted or reordered."""

    exit_code = 14
    default_hint = "keep the log read-only and compare it with its last backup; report the first bad record"


class DataError(SecureOneshotError):
    """A dataset file is missing, malformed, or of a task this version does not support."""

    exit_code = 15
    default_hint = "check --data-root (or SECURE_ONESHOT_DATA) and the dataset flag"


class QuarantinedBundlesError(SecureOneshotError):
    """Ingest finished, but quarantined some inbox entries (each with a reason file).

    The code of a completed run rather than of a failure: ``secure-oneshot ingest``
    prints its table and exits with it, so scripts can tell "all accepted" (0)
    from "some set aside" without parsing the output.
    """

    exit_code = 16
    default_hint = "read the reason files in quarantine/; the accepted bundles are usable"


class EvidenceError(SecureOneshotError):
    """The sites' released label counts show no hospital with records of both sides of a class."""

    exit_code = 17
    default_hint = ("add hospitals that hold both classes, or release label counts with a larger epsilon share; "
                    "--class-evidence report distils anyway and records the finding")


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug: please report it with the `-v` traceback)",
    2: "usage error (bad command-line arguments)",
    **{cls.exit_code: cls.__doc__.splitlines()[0] for cls in (  # type: ignore[union-attr]
        ConfigError, KeyMaterialError, BundleFormatError, BundleAuthError, PolicyViolationError,
        PrivacyError, ResourceError, TrustError, ReplayError, FreshnessError, TensorPayloadError, AuditLogError, DataError,
        QuarantinedBundlesError, EvidenceError,
    )},
}

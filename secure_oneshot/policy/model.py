"""Policy objects: frozen dataclasses, validated by ``load.py``, evaluated by ``evaluate.py``.

Two kinds of policy (policies/README.md explains every field for reviewers):

* :class:`ExportPolicy` -- what may leave a site, to whom, under which DP guarantee;
* :class:`IngestPolicy` -- what a server accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "ARTIFACTS",
    "ARTIFACT_MODES",
    "OPTIONAL_ARTIFACTS",
    "EXPORT_SCHEMA",
    "MIN_VALID_DAYS",
    "MAX_VALID_DAYS",
    "INGEST_SCHEMA",
    "TensorRule",
    "DpLimit",
    "StatementRules",
    "ExportPolicy",
    "IngestPolicy",
]

EXPORT_SCHEMA = "secure-oneshot/site-export-policy/v1"
INGEST_SCHEMA = "secure-oneshot/server-ingest-policy/v1"
# What can leave a site.  BatchNorm running statistics are split from the
# classifier because they are computed from patient data and feed model inversion.
# label_counts is the DP label histogram (client/label_counts.py).
ARTIFACTS = ("classifier", "generator", "bn_statistics", "dp_feature_statistics", "label_counts")
OPTIONAL_ARTIFACTS = ("label_counts",)
"""Artifacts an export policy may leave out of ``[artifacts]``: absent means ``"deny"`` (policies written before
the artifact existed stay valid and still refuse it)."""
ARTIFACT_MODES = ("allow", "deny", "allow-with-dp")
MIN_VALID_DAYS = 1 / 24   # a bundle valid for less than an hour cannot cross real transfer channels
MAX_VALID_DAYS = 365


@dataclass(frozen=True)
class TensorRule:
    """One entry of the tensor allow-list: which tensors of an artifact, which dtypes, how big."""

    artifact: str
    names: tuple[str, ...]          # fnmatch patterns on the payload name, e.g. "classifier/layer*.weight"
    dtypes: tuple[str, ...]         # safetensors dtype codes, e.g. ("F32", "BF16")
    max_bytes: int
    index: int = 0                  # position in the file, for explanations ("tensors[2]")


@dataclass(frozen=True)
class DpLimit:
    """The differential-privacy guarantee an artifact (or a composition) must meet."""

    max_epsilon: float
    max_delta: float
    accountants: tuple[str, ...] = ("prv", "rdp")
    require_poisson: bool = True


@dataclass(frozen=True)
class StatementRules:
    """``[privacy_statement]``: what the bundle's privacy statement must show, and what of the site it may state.

    Absent table: no requirement, nothing optional shared (the statement still travels in every export)."""

    require_privacy_audit: bool = False          # refuse an export without the site's audit-privacy results
    max_composed_epsilon: float | None = None    # over this bundle and earlier releases of the same data
    max_images_per_patient: int | None = None    # declared k: the statement gives the patient-level bound
    share_record_count: bool = False             # may the statement give delta x N (N = training records)?
    share_utility: bool = False                  # may it give the validation-slice metrics (computed without DP)?


@dataclass(frozen=True)
class ExportPolicy:
    """A site export policy (schema ``secure-oneshot/site-export-policy/v1``)."""

    id: str
    version: int
    owner: str
    effective: datetime
    expires: datetime
    study: dict[str, str]
    approvals_required: int
    approvers: tuple[str, ...]
    recipients: tuple[str, ...]
    artifacts: dict[str, str]
    tensors: tuple[TensorRule, ...]
    dp: dict[str, DpLimit]
    composed_dp: DpLimit | None
    max_bundle_bytes: int
    valid_days: float               # at least MIN_VALID_DAYS (one hour), at most 365
    privacy_statement: StatementRules = field(default_factory=StatementRules)
    sha256: str = field(default="", compare=False)
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class IngestPolicy:
    """A server ingest policy (schema ``secure-oneshot/server-ingest-policy/v1``)."""

    id: str
    version: int
    owner: str
    senders: tuple[str, ...]
    required_artifacts: tuple[str, ...]
    denied_artifacts: tuple[str, ...]
    dp: dict[str, DpLimit]
    require_dp: tuple[str, ...]
    architectures: tuple[str, ...]
    max_bundle_bytes: int
    max_tensors: int
    max_tensor_bytes: int
    require_site_policy: bool = False       # refuse bundles that do not carry their site's signed export policy
    min_site_policy_approvals: int = 1      # valid approvals of that policy by approvers in the server's trust store
    sha256: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

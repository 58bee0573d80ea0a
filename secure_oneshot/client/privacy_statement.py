"""Build the privacy statement that every export signs into its manifest (``bundle/PRIVACY_STATEMENT.md``).

Inputs are what the site already holds: the evaluated export (tensors that
leave, recomputed epsilons), the model directory's training record, the site's
verified audit log (earlier releases of the same data, for composition), the
export policy (what it requires and what it lets the statement say), and the
optional ``audit-privacy`` report.  Output: a JSON object that
:func:`secure_oneshot.policy.privacy_statement.parse_statement` accepts, plus
the policy's requirements as decisions.

No torch: accounting goes through ``policy/dp.py`` (Opacus's accountant files
loaded without the package).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .. import __version__, audit
from .._internal.encoding import format_time, parse_strict_json
from ..errors import ConfigError, PrivacyError
from ..policy.artifacts import ExportCandidate
from ..policy.dp import DpRecord, composed_epsilon, group_by_dataset
from ..policy.evaluate import Evaluation
from ..policy.model import ExportPolicy, StatementRules
from ..policy.privacy_statement import GROUP_PRIVACY_FORMULA, SCHEMA, encode, group_privacy, parse_statement

__all__ = ["PRIVACY_AUDIT_FILE", "read_privacy_audit", "build_statement", "requirement_decisions", "released_dp_records"]

PRIVACY_AUDIT_FILE = "privacy_audit.json"   # `audit-privacy --out MODEL/privacy_audit.json` puts it where export looks
MAX_AUDIT_REPORT_BYTES = 1 << 20
DP_PRESET_PREFIX = "dp preset:"             # client/train.py DP_PRESET_SOURCE: tuned on a public proxy


def read_privacy_audit(path: Path) -> tuple[dict[str, Any], str] | None:
    """The ``audit-privacy`` JSON report at ``path`` and its SHA-256, or None when there is none."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_AUDIT_REPORT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the privacy audit report {path}: {e.strerror}") from e
    try:
        report = parse_strict_json(raw, canonical=False, max_bytes=MAX_AUDIT_REPORT_BYTES)
    except ValueError as e:
        raise ConfigError(f"{path}: not an audit-privacy JSON report ({e})", hint="write it with `secure-oneshot audit-privacy --out FILE.json`") from e
    if not isinstance(report, dict) or not isinstance(report.get("attacks"), list):
        raise ConfigError(f"{path}: not an audit-privacy JSON report (no attacks)")
    return report, hashlib.sha256(raw).hexdigest()


def released_dp_records(candidate: ExportCandidate, tensors: Sequence[str]) -> dict[str, DpRecord]:
    sent = {candidate.artifact_of(n) for n in tensors}
    return {a: r for a, r in candidate.dp.items() if a in sent}


def _real(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return encode(float(value)) if ok else None


def _released(candidate: ExportCandidate, tensors: Sequence[str], dp: Mapping[str, DpRecord]) -> dict[str, Any]:
    per: dict[str, list[int]] = {}
    for name in tensors:
        entry = per.setdefault(candidate.artifact_of(name), [0, 0])
        entry[0] += 1
        entry[1] += int(candidate.tensors[name].nbytes)
    artifacts = [{"artifact": a, "tensors": n, "bytes": b, "dp": a in dp} for a, (n, b) in sorted(per.items())]
    return {"artifacts": artifacts, "tensors": len(tensors), "bytes": sum(b for _, b in per.values())}


def _dp_entry(record: DpRecord, epsilon: float, n_records: int | None, rules: StatementRules) -> dict[str, Any]:
    below = None if n_records is None else record.delta < 1 / n_records
    return {
        "epsilon": encode(epsilon), "delta": encode(record.delta), "accountant": record.accountant,
        "versions": dict(sorted(record.versions.items())), "max_grad_norm": encode(record.max_grad_norm),
        "sampling": record.sampling, "poisson": record.sampling == "poisson",
        "history": [{"noise_multiplier": encode(s), "sample_rate": encode(q), "steps": n} for s, q, n in record.history],
        "steps": sum(n for _, _, n in record.history), "epochs": encode(sum(q * n for _, q, n in record.history)),
        "delta_below_one_over_n": below,
        "delta_times_n": encode(record.delta * n_records) if n_records is not None and rules.share_record_count else None,
    }


def _composed_in_bundle(dp: Mapping[str, DpRecord]) -> list[dict[str, Any]]:
    out = []
    for _, names in group_by_dataset(dp).items():
        if len(names) >= 2:
            group = [dp[n] for n in names]
            delta = sum(r.delta for r in group)
            out.append({"epsilon": encode(composed_epsilon(group, delta)), "delta": encode(delta), "accountant": "rdp", "artifacts": names})
    return out


def _earlier(records: Sequence[audit.AuditRecord]) -> tuple[list[tuple[str, DpRecord]], int]:
    """(bundle id, DP record) of every earlier successful export that recorded its DP records; and how many did not."""
    found, unaccounted = [], 0
    for r in records:
        e = r.event
        if e.action != "export" or e.outcome != "ok":
            continue
        raw = e.details.get("dp_records") if isinstance(e.details, Mapping) else None
        if not isinstance(raw, Mapping):
            unaccounted += 1
            continue
        for artifact, obj in sorted(raw.items()):
            found.append((e.bundle_id, DpRecord.from_json(obj, f"audit log seq {r.seq}: dp_records.{artifact}")))
    return found, unaccounted


def _with_earlier(dp: Mapping[str, DpRecord], records: Sequence[audit.AuditRecord]) -> list[dict[str, Any]]:
    earlier, unaccounted = _earlier(records)
    out = []
    for fingerprint, names in group_by_dataset(dp).items():
        before = [(b, r) for b, r in earlier if r.dataset_fingerprint == fingerprint]
        group = [r for _, r in before] + [dp[n] for n in names]
        delta = sum(r.delta for r in group)
        note = ("sequential composition (RDP) of every DP record this site exported from the same data fingerprint, "
                "this bundle included")
        if unaccounted:
            note += f"; {unaccounted} earlier export(s) recorded no DP history and are not included"
        if delta >= 1:
            out.append({"epsilon": None, "delta": None, "accountant": "rdp", "releases": len({b for b, _ in before}),
                        "bundle_ids": [], "unaccounted_releases": unaccounted, "note": note + "; the summed delta reaches 1: no guarantee"})
            continue
        ids = sorted({b for b, _ in before})
        out.append({"epsilon": encode(composed_epsilon(group, delta)), "delta": encode(delta), "accountant": "rdp",
                    "releases": len(ids), "bundle_ids": ids[-64:], "unaccounted_releases": unaccounted, "note": note})
    return out


def _widest(dp: Mapping[str, Any], composed: Mapping[str, list[dict[str, Any]]]) -> tuple[float, float] | None:
    entries = [e for e in composed["with_earlier_releases"] if e["epsilon"] is not None] + list(composed["bundle"]) + list(dp.values())
    return max(((float(e["epsilon"]), float(e["delta"])) for e in entries), default=None)


def _unit(dp: Mapping[str, Any], composed: Mapping[str, Any], k: int | None) -> dict[str, Any]:
    level: dict[str, Any] = {"max_images_per_patient": k, "epsilon": None, "delta": None, "formula": GROUP_PRIVACY_FORMULA}
    widest = _widest(dp, composed)
    if not dp:
        text = "no artifact of this bundle is covered by differential privacy: no formal guarantee for records or patients"
    elif k is None:
        text = ("the guarantee protects one image at a time; there is NO patient-level guarantee (a patient with several "
                "images is protected only by group privacy over all of them, and the site declares no bound on that number)")
    else:
        assert widest is not None
        eps, delta = group_privacy(widest[0], widest[1], k)
        level.update(epsilon=encode(eps), delta=encode(delta))
        text = (f"the site declares at most {k} images per patient: the patient-level guarantee is the group-privacy bound "
                f"over k={k} records of the widest composition stated")
    return {"unit": "record (one image with its label)", "adjacency": "add or remove one record", "statement": text,
            "patient_level": level}


def _hyperparameters(training: Mapping[str, Any], dp: Mapping[str, Any]) -> dict[str, Any]:
    source = str(training.get("hyperparameters", ""))[:1000]
    if not dp:
        return {"source": source or "not recorded", "tuned_on_private_data": None, "tuning_accounted": False,
                "note": "no DP: the question does not arise"}
    if source.startswith(DP_PRESET_PREFIX):
        return {"source": source, "tuned_on_private_data": False, "tuning_accounted": True,
                "note": "tuned on a public proxy dataset: no privacy cost on this site's records"}
    return {"source": source or "not recorded", "tuned_on_private_data": None, "tuning_accounted": False,
            "note": "set in the site's configuration; if they were chosen by looking at results on these records, "
                    "that tuning's privacy cost is NOT in the epsilons above"}


def _attack(a: Mapping[str, Any]) -> dict[str, Any] | None:
    values = {k: _real(a.get(k)) for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_01pct_fpr", "epsilon_lower_bound")}
    if any(v is None for v in values.values()):
        return None
    return {"name": str(a.get("name", ""))[:200], **values}


def _empirical(audit_report: tuple[dict[str, Any], str] | None) -> dict[str, Any]:
    if audit_report is None:
        return {"privacy_audit": {"present": False, "sha256": "", "attacks": [], "delta": None},
                "near_copy": {"present": False, "ratio": None, "note": "no audit-privacy report with the model"}}
    report, sha256 = audit_report
    attacks = [a for a in (_attack(x) for x in report["attacks"][:32] if isinstance(x, Mapping)) if a]
    generator = report.get("generator") if isinstance(report.get("generator"), Mapping) else None
    for x in (generator or {}).get("attacks", [])[:16]:
        a = _attack(x) if isinstance(x, Mapping) else None
        if a:
            attacks.append({**a, "name": f"generator: {a['name']}"[:200]})
    memo = (generator or {}).get("memorisation")
    near = ({"present": True, "ratio": _real(memo.get("ratio")),
             "note": f"{memo.get('near_copies')} near-copies among {memo.get('images')} generator samples"[:300]}
            if isinstance(memo, Mapping) else {"present": False, "ratio": None, "note": "no generator audited"})
    return {"privacy_audit": {"present": True, "sha256": sha256, "attacks": attacks, "delta": _real(report.get("delta"))},
            "near_copy": near}


def _utility(training: Mapping[str, Any], rules: StatementRules) -> dict[str, Any]:
    metrics = training.get("metrics", {}).get("val", {}) if isinstance(training.get("metrics"), Mapping) else {}
    if not rules.share_utility or not isinstance(metrics, Mapping):
        return {"shared": False, "split": "site validation slice", "metrics": {},
                "dp_cost": "withheld: the export policy does not set privacy_statement.share_utility"}
    shown = {str(k)[:64]: _real(v) for k, v in sorted(metrics.items())[:32]}
    return {"shared": True, "split": "site validation slice (held out of training)", "metrics": shown,
            "dp_cost": "not covered by DP: measured on held-out records, released as is"}


def _versions(training: Mapping[str, Any]) -> dict[str, str]:
    raw = training.get("versions", {})
    return {str(k)[:64]: str(v)[:64] for k, v in sorted(raw.items())[:32]} if isinstance(raw, Mapping) else {}


def build_statement(policy: ExportPolicy, candidate: ExportCandidate, ev: Evaluation, *, now: datetime,
                    earlier: Sequence[audit.AuditRecord], audit_report: tuple[dict[str, Any], str] | None) -> dict[str, Any]:
    """The statement for exporting ``ev.allowed_tensors()`` of ``candidate`` at ``now`` (module docstring).

    Raises:
        PrivacyError: a composition cannot be recomputed (e.g. an earlier release's history), or the built
            statement breaks its own schema (a bug).
    """
    tensors = ev.allowed_tensors()
    records = released_dp_records(candidate, tensors)
    training = candidate.training
    data = training.get("data", {}) if isinstance(training.get("data"), Mapping) else {}
    n = data.get("train_records")
    n_records = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
    dp = {a: _dp_entry(r, ev.epsilons.get(a, r.epsilon), n_records, policy.privacy_statement) for a, r in sorted(records.items())}
    composed = {"bundle": _composed_in_bundle(records), "with_earlier_releases": _with_earlier(records, earlier)}
    created = now.replace(microsecond=0)
    fingerprint = next(iter(sorted({r.dataset_fingerprint for r in records.values()})), str(data.get("fingerprint", ""))[:128])
    statement = {
        "schema": SCHEMA,
        "released": _released(candidate, tensors, records),
        "unit_of_privacy": _unit(dp, composed, policy.privacy_statement.max_images_per_patient),
        "dp": dp,
        "composed": composed,
        "hyperparameters": _hyperparameters(training, dp),
        "empirical": _empirical(audit_report),
        "utility": _utility(training, policy.privacy_statement),
        "provenance": {
            "code_version": f"secure-oneshot {__version__}", "training_versions": _versions(training),
            "data_fingerprint": fingerprint, "policy_id": policy.id, "policy_version": policy.version,
            "policy_sha256": policy.sha256, "exported": format_time(created),
            "expires": format_time(created + timedelta(days=policy.valid_days)),
        },
    }
    return parse_statement(statement)


def requirement_decisions(rules: StatementRules, statement: Mapping[str, Any]) -> list[tuple[str, str, bool, str]]:
    """The export policy's ``[privacy_statement]`` requirements judged on a built statement: (subject, rule, ok, reason)."""
    out = []
    if rules.require_privacy_audit:
        present = statement["empirical"]["privacy_audit"]["present"]
        out.append(("privacy_audit", "privacy_statement.require_privacy_audit", present,
                    "audit-privacy results present" if present else f"no audit-privacy report ({PRIVACY_AUDIT_FILE} in the model directory)"))
    if rules.max_composed_epsilon is not None:
        widest = _widest(statement["dp"], statement["composed"])
        if widest is None:
            out.append(("composed", "privacy_statement.max_composed_epsilon", False, "no DP guarantee to bound: nothing is covered by DP"))
        else:
            out.append(("composed", "privacy_statement.max_composed_epsilon", widest[0] <= rules.max_composed_epsilon,
                        f"epsilon {widest[0]:.3g} over this bundle and earlier releases of the same data vs limit {rules.max_composed_epsilon:g}"))
    return out


def statement_failure(error: PrivacyError) -> PrivacyError:
    return PrivacyError(f"cannot build the privacy statement: {error.message}", hint=error.hint)

"""The privacy statement (``meta.privacy_statement``): its schema, a strict bounded parser, and its check
against the bundle it travels in.

``bundle/PRIVACY_STATEMENT.md`` is the specification; this module implements
schema ``secure-oneshot/privacy-statement/v1``.  The statement is built at the
site (``client/privacy_statement.py``), signed and encrypted inside the
manifest, and checked at the server (:func:`check_statement`): every number it
states that the bundle itself can confirm (artifacts, tensor counts and bytes,
DP parameters, recomputed epsilons, the bundle's composed epsilon, the
group-privacy bound, provenance) must agree, else the bundle is refused.

What it does not do: read files, build statements, or decide whether a
statement is *enough* (the export policy's ``[privacy_statement]`` table does).
Everything here is a pure function of its arguments; nothing imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .._internal.encoding import canonical_json, json_depth
from ..errors import PrivacyError
from .dp import DpRecord, decode_real, encode_real

__all__ = ["SCHEMA", "MAX_STATEMENT_BYTES", "MAX_STATEMENT_DEPTH", "parse_statement", "check_statement",
           "group_privacy", "GROUP_PRIVACY_FORMULA", "public_summary", "summary_lines", "summary_line", "epsilon_of", "encode"]

SCHEMA = "secure-oneshot/privacy-statement/v1"
MAX_STATEMENT_BYTES = 64 * 1024   # a statement is a few kilobytes; canonical JSON bytes
MAX_STATEMENT_DEPTH = 8           # the schema nests 5 deep; anything deeper is refused before it is walked
MAX_LIST = 64                     # artifacts, history entries, earlier bundle ids, attacks
GROUP_PRIVACY_FORMULA = "epsilon_k = k * epsilon; delta_k = k * exp((k - 1) * epsilon) * delta"
_HINT = "the site's privacy statement is malformed; ask the site to export the bundle again with this version"

# --- schema: field -> kind.  Kinds: "str", "bool", "int", "real" (canonical decimal string), a trailing "?"
# allows null; a dict is a nested object (exactly these keys); ("list", kind) and ("map", kind) are bounded
# arrays and artifact-keyed objects.  Every key is required; unknown keys are refused.

_HISTORY = {"noise_multiplier": "real", "sample_rate": "real", "steps": "int"}
_DP_ENTRY = {
    "epsilon": "real", "delta": "real", "accountant": "str", "versions": ("map", "str"), "max_grad_norm": "real",
    "sampling": "str", "poisson": "bool", "history": ("list", _HISTORY), "steps": "int", "epochs": "real",
    "delta_below_one_over_n": "bool?", "delta_times_n": "real?",
}
_ARTIFACT = {"artifact": "str", "tensors": "int", "bytes": "int", "dp": "bool"}
_COMPOSED = {"epsilon": "real", "delta": "real", "accountant": "str", "artifacts": ("list", "str")}
_EARLIER = {"epsilon": "real?", "delta": "real?", "accountant": "str", "releases": "int", "bundle_ids": ("list", "str"),
            "unaccounted_releases": "int", "note": "str"}
_ATTACK = {"name": "str", "auc": "real", "tpr_at_1pct_fpr": "real", "tpr_at_01pct_fpr": "real", "epsilon_lower_bound": "real"}
SCHEMA_FIELDS: dict[str, Any] = {
    "schema": "str",
    "released": {"artifacts": ("list", _ARTIFACT), "tensors": "int", "bytes": "int"},
    "unit_of_privacy": {
        "unit": "str", "adjacency": "str", "statement": "str",
        "patient_level": {"max_images_per_patient": "int?", "epsilon": "real?", "delta": "real?", "formula": "str"},
    },
    "dp": ("map", _DP_ENTRY),
    "composed": {"bundle": ("list", _COMPOSED), "with_earlier_releases": ("list", _EARLIER)},
    "hyperparameters": {"source": "str", "tuned_on_private_data": "bool?", "tuning_accounted": "bool", "note": "str"},
    "empirical": {
        "privacy_audit": {"present": "bool", "sha256": "str", "attacks": ("list", _ATTACK), "delta": "real?"},
        "near_copy": {"present": "bool", "ratio": "real?", "note": "str"},
    },
    "utility": {"shared": "bool", "split": "str", "metrics": ("map", "real?"), "dp_cost": "str"},
    "provenance": {
        "code_version": "str", "training_versions": ("map", "str"), "data_fingerprint": "str", "policy_id": "str",
        "policy_version": "int", "policy_sha256": "str", "exported": "str", "expires": "str",
    },
}


def _bad(path: str, problem: str) -> PrivacyError:
    return PrivacyError(f"privacy statement: {path}: {problem}", hint=_HINT)


def _check_scalar(value: Any, kind: str, path: str) -> None:
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    ok = {"str": lambda v: isinstance(v, str) and len(v) <= 4096,
          "bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
          "real": lambda v: isinstance(v, str)}[kind](value)
    if not ok:
        raise _bad(path, f"must be {'a decimal string' if kind == 'real' else 'a non-negative integer' if kind == 'int' else kind}, "
                         f"got {type(value).__name__}")
    if kind == "real":
        try:
            decode_real(value, path)
        except PrivacyError as e:
            raise _bad(path, f"{value!r} is not a canonical decimal number") from e


def _check(value: Any, spec: Any, path: str) -> None:
    if isinstance(spec, str):
        _check_scalar(value, spec, path)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _bad(path, f"must be an object, got {type(value).__name__}")
        for key in spec:
            if key not in value:
                raise _bad(f"{path}.{key}".lstrip("."), "missing (required field)")
        for key in sorted(set(value) - set(spec)):
            raise _bad(f"{path}.{key}".lstrip("."), "unknown field (refused)")
        for key, kind in spec.items():
            _check(value[key], kind, f"{path}.{key}".lstrip("."))
    else:
        container, inner = spec
        expected = list if container == "list" else dict
        if not isinstance(value, expected):
            raise _bad(path, f"must be {'an array' if expected is list else 'an object'}, got {type(value).__name__}")
        if len(value) > MAX_LIST:
            raise _bad(path, f"more than {MAX_LIST} entries")
        items = enumerate(value) if container == "list" else value.items()
        for key, item in items:
            _check(item, inner, f"{path}[{key}]" if container == "list" else f"{path}.{key}")


def parse_statement(value: Any) -> dict[str, Any]:
    """Validate a statement (already parsed JSON) against the v1 schema; returns it unchanged.

    Size and depth are checked on its canonical bytes before the schema is walked.

    Raises:
        PrivacyError: naming the first field that is missing, unknown, of the wrong type or out of bounds.
    """
    if not isinstance(value, dict):
        raise _bad("(top)", f"must be an object, got {type(value).__name__}")
    try:
        raw = canonical_json(value)
    except (TypeError, ValueError) as e:
        raise _bad("(top)", f"not canonical JSON ({e})") from e
    if len(raw) > MAX_STATEMENT_BYTES:
        raise _bad("(top)", f"{len(raw)} bytes, over the {MAX_STATEMENT_BYTES}-byte limit")
    if json_depth(raw) > MAX_STATEMENT_DEPTH:
        raise _bad("(top)", f"nested deeper than {MAX_STATEMENT_DEPTH} levels")
    if value.get("schema") != SCHEMA:
        raise _bad("schema", f"must be {SCHEMA!r}, got {value.get('schema')!r}")
    _check(value, SCHEMA_FIELDS, "")
    return value


# --- group privacy -------------------------------------------------------------------------------


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one record implies this for any k records (one patient's k images).

    Standard group privacy (Dwork & Roth, Lemma 2.2 extended to approximate DP): see :data:`GROUP_PRIVACY_FORMULA`.
    A delta that exceeds 1 is reported as 1.0 (no guarantee).
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    exponent = (k - 1) * epsilon
    group_delta = 1.0 if exponent > 700 else min(1.0, k * math.exp(exponent) * delta)
    return k * epsilon, group_delta


# --- check against the bundle ----------------------------------------------------------------------


def _real(value: Any) -> float:
    return decode_real(value, "privacy statement")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-3)


def _released(tensor_artifacts: Mapping[str, str], tensor_bytes: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for name, artifact in tensor_artifacts.items():
        n, b = counts.get(artifact, (0, 0))
        counts[artifact] = (n + 1, b + int(tensor_bytes[name]))
    return counts


def _check_released(statement: dict[str, Any], tensor_artifacts: Mapping[str, str], tensor_bytes: Mapping[str, int],
                    dp: Mapping[str, DpRecord]) -> list[str]:
    problems = []
    actual = _released(tensor_artifacts, tensor_bytes)
    stated = {a["artifact"]: a for a in statement["released"]["artifacts"]}
    if set(stated) != set(actual):
        problems.append(f"released artifacts {sorted(stated)} but the bundle holds {sorted(actual)}")
    for artifact, (count, size) in sorted(actual.items()):
        entry = stated.get(artifact)
        if entry is None:
            continue
        if entry["tensors"] != count:
            problems.append(f"states {entry['tensors']} tensor(s) for {artifact}, the bundle holds {count}")
        if entry["bytes"] != size:
            problems.append(f"states {entry['bytes']} bytes for {artifact}, the bundle holds {size}")
        if entry["dp"] != (artifact in dp):
            problems.append(f"states dp={entry['dp']} for {artifact}, the bundle {'has' if artifact in dp else 'has no'} DP record for it")
    totals = (statement["released"]["tensors"], statement["released"]["bytes"])
    if totals != (len(tensor_artifacts), sum(int(b) for b in tensor_bytes.values())):
        problems.append(f"states {totals[0]} tensors / {totals[1]} bytes in all, the bundle holds "
                        f"{len(tensor_artifacts)} / {sum(int(b) for b in tensor_bytes.values())}")
    return problems


def _check_dp_entry(artifact: str, entry: dict[str, Any], record: DpRecord, recomputed: float | None) -> list[str]:
    problems = []
    epsilon = _real(entry["epsilon"])
    for name, reference in (("the DP record's claim", record.epsilon), ("the recomputed epsilon", recomputed)):
        if reference is not None and not _close(epsilon, reference):
            problems.append(f"dp.{artifact}.epsilon {epsilon:.4g} disagrees with {name} {reference:.4g}")
    history = [(_real(h["noise_multiplier"]), _real(h["sample_rate"]), h["steps"]) for h in entry["history"]]
    same = {
        "delta": _real(entry["delta"]) == record.delta,
        "accountant": entry["accountant"] == record.accountant,
        "max_grad_norm": _real(entry["max_grad_norm"]) == record.max_grad_norm,
        "sampling": entry["sampling"] == record.sampling,
        "poisson": entry["poisson"] == (record.sampling == "poisson"),
        "history": tuple(history) == tuple(record.history),
        "steps": entry["steps"] == sum(n for _, _, n in record.history),
        "epochs": _close(_real(entry["epochs"]), sum(q * n for _, q, n in record.history)),
        "versions": dict(entry["versions"]) == dict(record.versions),
    }
    problems += [f"dp.{artifact}.{key} disagrees with the bundle's DP record" for key, ok in same.items() if not ok]
    return problems


def _check_dp(statement: dict[str, Any], dp: Mapping[str, DpRecord], epsilons: Mapping[str, float]) -> list[str]:
    stated = statement["dp"]
    problems = []
    if set(stated) != set(dp):
        problems.append(f"states DP for {sorted(stated)} but the bundle's DP records cover {sorted(dp)}")
    for artifact in sorted(set(stated) & set(dp)):
        problems += _check_dp_entry(artifact, stated[artifact], dp[artifact], epsilons.get(artifact))
    return problems


def _check_earlier(statement: dict[str, Any]) -> list[str]:
    """A composition over earlier releases includes this bundle: it cannot be smaller than what this bundle spends."""
    problems = []
    for entry in statement["composed"]["with_earlier_releases"]:
        if entry["epsilon"] is not None:
            own = [_real(b["epsilon"]) for b in statement["composed"]["bundle"]]
            floor = max(own + [_real(e["epsilon"]) for e in statement["dp"].values()], default=0.0)
            if _real(entry["epsilon"]) + 1e-9 < floor * (1 - 1e-2):
                problems.append(f"composed epsilon over earlier releases {_real(entry['epsilon']):.4g} is below this bundle's own {floor:.4g}")
    return problems


def _check_patient_level(statement: dict[str, Any], dp: Mapping[str, DpRecord]) -> list[str]:
    level = statement["unit_of_privacy"]["patient_level"]
    k = level["max_images_per_patient"]
    if k is None:
        return [] if level["epsilon"] is None else ["states a patient-level epsilon without max_images_per_patient"]
    if level["epsilon"] is None or level["delta"] is None:
        return [] if not dp else ["declares max_images_per_patient but states no patient-level epsilon"]
    worst = _worst(statement)
    if worst is None:
        return []
    expected = group_privacy(worst[0], worst[1], k)
    ok = _close(_real(level["epsilon"]), expected[0]) and _close(_real(level["delta"]), expected[1])
    return [] if ok else [f"patient-level epsilon {level['epsilon']} / delta {level['delta']} disagrees with group privacy "
                          f"at k={k} ({expected[0]:.4g} / {expected[1]:.3g})"]


def _worst(statement: dict[str, Any]) -> tuple[float, float] | None:
    """The record-level (epsilon, delta) the patient-level bound is built on: the widest composition stated."""
    candidates = [(_real(e["epsilon"]), _real(e["delta"])) for e in statement["composed"]["with_earlier_releases"] if e["epsilon"] is not None]
    candidates += [(_real(e["epsilon"]), _real(e["delta"])) for e in statement["composed"]["bundle"]]
    candidates += [(_real(e["epsilon"]), _real(e["delta"])) for e in statement["dp"].values()]
    return max(candidates, default=None)


def _check_provenance(statement: dict[str, Any], manifest: Mapping[str, Any], dp: Mapping[str, DpRecord]) -> list[str]:
    p = statement["provenance"]
    meta = manifest.get("meta", {}) if isinstance(manifest.get("meta"), dict) else {}
    expected = {"policy_id": manifest.get("policy_id"), "policy_sha256": manifest.get("policy_sha256"),
                "policy_version": meta.get("policy_version"), "exported": manifest.get("created"), "expires": manifest.get("expires")}
    problems = [f"provenance.{k} {p[k]!r} disagrees with the manifest's {v!r}" for k, v in expected.items() if p[k] != v]
    fingerprints = {r.dataset_fingerprint for r in dp.values()}
    if fingerprints and p["data_fingerprint"] not in fingerprints:
        problems.append("provenance.data_fingerprint is not the fingerprint of the bundle's DP records")
    return problems


def check_statement(statement: Any, *, manifest: Mapping[str, Any], tensor_artifacts: Mapping[str, str],
                    tensor_bytes: Mapping[str, int], dp: Mapping[str, DpRecord], epsilons: Mapping[str, float],
                    composed: Mapping[str, float] | None = None) -> list[str]:
    """Every way ``statement`` disagrees with the bundle it travels in (empty: it agrees).

    Args:
        statement: ``meta.privacy_statement`` as received (parsed here first).
        manifest: the verified manifest as JSON (created, expires, policy fields, meta).
        tensor_artifacts: payload tensor name -> artifact (the structural classification).
        tensor_bytes: payload tensor name -> bytes.
        dp: the bundle's parsed DP records.
        epsilons: artifact -> epsilon recomputed by the verifier.
        composed: "+"-joined artifact names -> composed epsilon recomputed by the verifier.

    Raises:
        PrivacyError: the statement breaks the schema.
    """
    parse_statement(statement)
    problems = _check_released(statement, tensor_artifacts, tensor_bytes, dp)
    problems += _check_dp(statement, dp, epsilons)
    for entry in statement["composed"]["bundle"]:
        key = "+".join(entry["artifacts"])
        if composed is not None and key in composed and not _close(_real(entry["epsilon"]), composed[key]):
            problems.append(f"composed epsilon of {key} {_real(entry['epsilon']):.4g} disagrees with the recomputed {composed[key]:.4g}")
        if composed is not None and key not in composed:
            problems.append(f"states a composition of {key} that the bundle's DP records do not form")
    problems += _check_earlier(statement)
    problems += _check_patient_level(statement, dp)
    problems += _check_provenance(statement, manifest, dp)
    return problems


# --- for people ------------------------------------------------------------------------------------


def public_summary(statement: Mapping[str, Any]) -> dict[str, Any]:
    """The parts a reviewer outside the study may read: guarantees and evidence, not the data's size or fingerprint.

    Left out: sample rates, steps and epochs (with a known batch size they give the record count), the tensor
    inventory, the data fingerprint, and delta x N.
    """
    dp = {a: {k: e[k] for k in ("epsilon", "delta", "accountant", "max_grad_norm", "sampling")} |
          {"noise_multipliers": sorted({h["noise_multiplier"] for h in e["history"]})} for a, e in statement["dp"].items()}
    p = statement["provenance"]
    return {
        "schema": statement["schema"],
        "artifacts": [{"artifact": a["artifact"], "dp": a["dp"]} for a in statement["released"]["artifacts"]],
        "unit_of_privacy": statement["unit_of_privacy"],
        "dp": dp,
        "composed": statement["composed"],
        "hyperparameters": statement["hyperparameters"],
        "empirical": statement["empirical"],
        "utility": statement["utility"],
        "provenance": {k: p[k] for k in ("code_version", "policy_id", "policy_version", "policy_sha256", "exported", "expires")},
    }


def summary_lines(statement: Mapping[str, Any]) -> list[str]:
    """A few lines for ``verify``/``ingest`` output: per-artifact guarantee, composition, unit, evidence."""
    lines = ["privacy statement (signed by the site):"]
    for artifact, e in sorted(statement["dp"].items()):
        lines.append(f"  {artifact:12s} epsilon {_real(e['epsilon']):.3g}, delta {_real(e['delta']):.3g} "
                     f"({e['accountant']}, {e['sampling']} sampling)")
    undp = [a["artifact"] for a in statement["released"]["artifacts"] if not a["dp"]]
    if undp:
        lines.append(f"  without DP:  {', '.join(undp)}")
    for c in statement["composed"]["bundle"]:
        lines.append(f"  composed     epsilon {_real(c['epsilon']):.3g} over {'+'.join(c['artifacts'])}")
    for c in statement["composed"]["with_earlier_releases"]:
        shown = f"epsilon {_real(c['epsilon']):.3g}" if c["epsilon"] is not None else "not computed"
        lines.append(f"  with earlier releases of the same data ({c['releases']}): {shown}")
    unit = statement["unit_of_privacy"]
    lines.append(f"  unit         {unit['unit']} ({unit['adjacency']}); {unit['statement']}")
    audit = statement["empirical"]["privacy_audit"]
    if audit["present"]:
        best = max((_real(a["auc"]) for a in audit["attacks"]), default=float("nan"))
        lines.append(f"  audit        membership attacks: best AUC {best:.3f}")
    else:
        lines.append("  audit        no privacy audit results")
    return lines


def summary_line(statement: Mapping[str, Any]) -> str:
    """One line: each DP artifact's epsilon, the widest composition, and what has no DP."""
    parts = [f"{a} eps {_real(e['epsilon']):.3g}" for a, e in sorted(statement["dp"].items())]
    widest = _worst(dict(statement))
    if widest is not None and len(parts) + len(statement["composed"]["with_earlier_releases"]) > 1:
        parts.append(f"composed eps {widest[0]:.3g}")
    undp = [a["artifact"] for a in statement["released"]["artifacts"] if not a["dp"]]
    if undp:
        parts.append("no DP: " + "+".join(undp))
    return "; ".join(parts) or "nothing released"


def epsilon_of(value: str) -> float:
    """A statement's decimal string as a float (for callers outside this module)."""
    return _real(value)


def encode(value: float) -> str:
    """A float as the statement's canonical decimal string."""
    return encode_real(value)

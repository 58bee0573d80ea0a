"""Differential-privacy records: parse them strictly, recompute their epsilon, compose them.

A *DP record* is what a site's DP training writes for one artifact and what
travels in a bundle's signed manifest under ``dp[<artifact>]``: the accountant
history (noise multiplier, sample rate, steps), delta, the claimed epsilon, the
clipping norm, the sampling mode, a fingerprint of the records trained on, and
library versions.  DP claims are verified, not trusted (DESIGN.md, Policies):
:func:`verify_claim` recomputes epsilon from the history with Opacus and refuses
a claim that disagrees.  Opacus's accountant code is loaded by
:mod:`.opacus_accounting` without the ``opacus`` package itself, so checking a
claim imports NumPy and SciPy (Opacus's analysis needs them) but not PyTorch.

What this module does *not* do: decide whether a record is acceptable (the
policy layer compares epsilon, delta, accountant and sampling mode with its
limits), read files, or keep state.  Everything here is a pure function of its
arguments (STYLE.md 9, "Accounting math is pure").

Decisions worth knowing:

* Accountants: ``"rdp"`` and ``"prv"`` only.  Opacus's ``"gdp"`` is refused:
  its ``get_epsilon`` reads only the *last* history entry (a heterogeneous
  history is silently under-counted), and it is a central-limit approximation
  that Opacus itself warns "can underestimate privacy expenditure"; it is not an
  upper bound, so a GDP claim cannot be verified as a guarantee.
* The accountants' numerical settings are pinned here (:data:`RDP_ORDERS`,
  :data:`PRV_EPS_ERROR`, :data:`PRV_DELTA_ERROR_RATIO`, equal to Opacus 1.6's
  defaults) so that a change of Opacus defaults cannot silently change what
  "recomputed" means.  PRV reports Opacus's *upper* bound (estimate + error).
* Opacus's amplification-by-subsampling analysis (both accountants) assumes
  **Poisson** sampling.  Records with ``sampling`` ``"shuffle"`` or ``"fixed"``
  parse, but the recomputed epsilon is only valid for Poisson sampling; the
  policy layer decides whether to refuse them.
* Reals travel as canonical decimal strings (``repr`` of the float, e.g.
  ``"1e-05"``, ``"1.1"``) because signed JSON holds no floats.

>>> record = DpRecord("rdp", ((1.0, 1.0, 10),), 1e-5, 19.0536, 1.0, "poisson", "sha256:ab", {})
>>> round(verify_claim(record), 4)
19.0536
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import PrivacyError
from .._internal.encoding import MAX_SAFE_INT
from .opacus_accounting import accountant_class, prv_analysis

__all__ = [
    "ACCOUNTANTS",
    "SAMPLING_MODES",
    "RDP_ORDERS",
    "PRV_EPS_ERROR",
    "PRV_DELTA_ERROR_RATIO",
    "MAX_HISTORY_ENTRIES",
    "MAX_BUNDLE_HISTORY_ENTRIES",
    "MAX_DISTINCT_ENTRIES",
    "SAMPLE_RATE_RANGE",
    "MAX_STEPS",
    "check_bundle_history",
    "quiet_accountant",
    "NOISE_MULTIPLIER_RANGE",
    "MAX_PRV_CELLS",
    "DpRecord",
    "encode_real",
    "decode_real",
    "compute_epsilon",
    "verify_claim",
    "composed_epsilon",
    "group_by_dataset",
    "dp_record_from_opacus",
]

ACCOUNTANTS = ("rdp", "prv")
"""Accountants whose epsilon we can recompute as an upper bound ("gdp" is refused, see the module docstring)."""

SAMPLING_MODES = ("poisson", "shuffle", "fixed")
"""Poisson (what Opacus's analysis assumes), shuffled fixed-size batches, fixed-size batches without replacement."""

RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])
"""RDP orders searched by the RDP-to-(eps, delta) conversion (Opacus 1.6 ``RDPAccountant.DEFAULT_ALPHAS``)."""

PRV_EPS_ERROR = 0.01
"""PRV accountant's epsilon error; the reported epsilon is the upper bound estimate + this (Opacus 1.6 default)."""

PRV_DELTA_ERROR_RATIO = 1e-3
"""PRV accountant's delta error as a fraction of delta (Opacus 1.6 default: ``delta / 1000``)."""

MAX_HISTORY_ENTRIES = 1024
"""Most history entries a record may carry (Opacus merges consecutive identical steps into one entry)."""

MAX_BUNDLE_HISTORY_ENTRIES = 10_000
"""Most history entries all DP records of one bundle may carry together (:func:`check_bundle_history`)."""

MAX_DISTINCT_ENTRIES = 16
"""Most distinct (noise multiplier, sample rate) pairs one recomputation accepts.

Entries with the same pair compose by adding their steps (exactly, for both
accountants), so only distinct pairs cost work.  Opacus's RDP series costs
about 20 ms per pair for sample rates up to 0.1, but up to 2-5 s at sample
rate 0.5 with a large noise multiplier (PRV up to ~10 s, measured on this
project's 2-core VM), so this cap bounds one recomputation to about a minute
(RDP) or a few minutes (PRV) whatever the record says.
"""

SAMPLE_RATE_RANGE = (1e-9, 1.0)
"""Sample rates :func:`compute_epsilon` accepts (records outside still parse).

Below 1e-9 (a batch from a billion records) Opacus's RDP series at a small noise
multiplier takes seconds per entry (4.5 s at 1e-12, measured), for no real use.
"""

MAX_STEPS = 10**9
"""Most steps per history entry :func:`compute_epsilon` accepts (records up to 2^53 - 1 still parse)."""

NOISE_MULTIPLIER_RANGE = (1e-3, 1e4)
"""Noise multipliers :func:`compute_epsilon` accepts (records outside still parse).

Outside it Opacus misbehaves: below ~1e-154, ``sigma**2`` underflows and the RDP
series never terminates (a hang); large values cost seconds per entry.  Below
1e-3 epsilon exceeds 5e5 (no privacy); above 1e4 one more decade changes nothing.
"""

MAX_PRV_CELLS = 2**26
"""Most (history entries x discretisation points) the PRV accountant may use (~0.5 GiB per float64 array set).

Beyond this, recomputation would take minutes and gigabytes (tiny noise or very
long training); :func:`compute_epsilon` refuses instead of hanging the verifier.
"""

_REAL_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")
_VERSION_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION_VALUE_RE = re.compile(r"[\x21-\x7e]{1,64}")
_MAX_VERSIONS = 32
_RECORD_FIELDS = ("accountant", "history", "delta", "epsilon", "max_grad_norm", "sampling", "dataset_fingerprint", "versions")
_ENTRY_FIELDS = ("noise_multiplier", "sample_rate", "steps")
_MALFORMED_HINT = "the DP record is malformed; ask the sending site to export the bundle again"


# --- small checks (each raises PrivacyError naming the field path) --------------------------------


def _malformed(path: str, problem: str) -> PrivacyError:
    return PrivacyError(f"malformed DP record: {path}: {problem}", hint=_MALFORMED_HINT)


def _as_real(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _malformed(path, f"must be a real number, got {type(value).__name__}")
    return float(value)


def _as_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _malformed(path, f"must be an integer, got {type(value).__name__}")
    return int(value)


def _check_range(value: float, path: str, low: float, high: float, *, high_inclusive: bool) -> float:
    """Require ``low < value < high`` (or ``<= high``), finite."""
    below_high = value <= high if high_inclusive else value < high
    if not (math.isfinite(value) and low < value and below_high):
        bound = f"{'<=' if high_inclusive else '<'} {high:g}" if math.isfinite(high) else "finite"
        raise _malformed(path, f"must be > {low:g} and {bound}, got {value!r}")
    return value


def _positive(value: float, path: str) -> float:
    return _check_range(value, path, 0.0, math.inf, high_inclusive=False)


def _check_steps(value: int, path: str) -> int:
    if not 1 <= value <= MAX_SAFE_INT:
        raise _malformed(path, f"must be an integer in 1..2^53-1, got {value}")
    return value


def _check_entry(entry: Any, path: str) -> tuple[float, float, int]:
    if not isinstance(entry, (tuple, list)) or len(entry) != 3:
        raise _malformed(path, "must be a (noise_multiplier, sample_rate, steps) triple")
    sigma = _positive(_as_real(entry[0], f"{path}.noise_multiplier"), f"{path}.noise_multiplier")
    rate = _check_range(_as_real(entry[1], f"{path}.sample_rate"), f"{path}.sample_rate", 0.0, 1.0, high_inclusive=True)
    return sigma, rate, _check_steps(_as_int(entry[2], f"{path}.steps"), f"{path}.steps")


def _check_history(history: Any, path: str) -> tuple[tuple[float, float, int], ...]:
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise _malformed(path, "must be a sequence of (noise_multiplier, sample_rate, steps)")
    entries = list(history)
    if not 1 <= len(entries) <= MAX_HISTORY_ENTRIES:
        raise _malformed(path, f"must have 1..{MAX_HISTORY_ENTRIES} entries, got {len(entries)}")
    return tuple(_check_entry(entry, f"{path}[{i}]") for i, entry in enumerate(entries))


def _check_choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        refused_gdp = choices is ACCOUNTANTS and value == "gdp"
        extra = "; gdp is refused: it can underestimate epsilon and ignores all but the last history entry" \
            if refused_gdp else ""
        raise _malformed(path, f"must be one of {list(choices)}, got {value!r}{extra}")
    return value


def _check_pattern(value: Any, path: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _malformed(path, f"must be {what}, got {value!r}")
    return value


def _check_versions(versions: Any, path: str) -> dict[str, str]:
    if not isinstance(versions, Mapping):
        raise _malformed(path, f"must be an object of strings, got {type(versions).__name__}")
    if len(versions) > _MAX_VERSIONS:
        raise _malformed(path, f"must have at most {_MAX_VERSIONS} entries")
    for key, value in versions.items():
        _check_pattern(key, f"{path} key", _VERSION_KEY_RE, "a package name of 1..64 [A-Za-z0-9._-]")
        _check_pattern(value, f"{path}.{key}", _VERSION_VALUE_RE, "a version of 1..64 printable ASCII characters")
    return dict(versions)


# --- decimal strings -----------------------------------------------------------------------------


def encode_real(x: float) -> str:
    """Encode a finite real as its canonical decimal string (Python ``repr`` of the float).

    Args:
        x: a finite real number (``int`` or ``float``, not ``bool``).

    Returns:
        The shortest string that round-trips, e.g. ``"1e-05"``, ``"1.1"``, ``"500.0"``.

    Raises:
        TypeError: ``x`` is not a real number (a caller bug).
        ValueError: ``x`` is NaN or infinite (a caller bug).
    """
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"encode_real needs a real number, got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"encode_real needs a finite number, got {value!r}")
    return repr(value)


def decode_real(s: Any, where: str, *, canonical: bool = True) -> float:
    """Decode a decimal string strictly: JSON number syntax, finite, and (by default) canonical.

    Rejects non-strings (a JSON float included), empty strings, whitespace, ``"nan"``,
    ``"inf"``, hex, underscores, ``"+1"``, ``".5"`` and values that overflow to infinity.
    With ``canonical`` (the default) the string must also equal :func:`encode_real`
    of its value (``"1e-05"``, not ``"0.00001"``), so accepted JSON re-serialises
    to the same bytes.

    Args:
        s: the JSON value to decode.
        where: the field path for error messages, e.g. ``"dp.classifier.delta"``.
        canonical: also require the canonical spelling.

    Returns:
        The value as a float.

    Raises:
        PrivacyError: naming ``where`` when ``s`` is not an acceptable decimal string.
    """
    if not isinstance(s, str):
        raise _malformed(where, f"must be a decimal string such as \"1.1\", got {type(s).__name__}")
    if not _REAL_RE.fullmatch(s):
        raise _malformed(where, f"{s!r} is not a decimal number")
    value = float(s)
    if not math.isfinite(value):
        raise _malformed(where, f"{s!r} is out of range")
    if canonical and repr(value) != s:
        raise _malformed(where, f"{s!r} is not canonical; write {repr(value)!r}")
    return value


# --- the record ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DpRecord:
    """One artifact's DP training record, as the site claims it.

    The constructor validates every field (and normalises ``history`` to a tuple of
    ``(float, float, int)`` and ``versions`` to a ``dict`` copy, to be treated as
    read-only).  The recomputed epsilon is only valid when ``sampling == "poisson"``.

    Raises:
        PrivacyError: a field has the wrong type or is out of range.
    """

    accountant: str                                    # "prv" | "rdp"
    history: tuple[tuple[float, float, int], ...]      # (noise_multiplier, sample_rate, steps), >= 1 entry
    delta: float                                       # 0 < delta < 1
    epsilon: float                                     # the site's claim, > 0, finite
    max_grad_norm: float                               # clipping norm (or a statistic's sensitivity), > 0
    sampling: str                                      # one of SAMPLING_MODES
    dataset_fingerprint: str                           # identifies the records trained on (for composition)
    versions: Mapping[str, str] = field(hash=False)    # e.g. {"opacus": "1.6.0", "torch": "2.3.0"}

    def __post_init__(self) -> None:
        where = "DpRecord"
        values = _validated(self.__dict__, where)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """The record as canonical-JSON-able data: reals as decimal strings, steps as ints."""
        return {
            "accountant": self.accountant,
            "history": [
                {"noise_multiplier": encode_real(s), "sample_rate": encode_real(q), "steps": n}
                for s, q, n in self.history
            ],
            "delta": encode_real(self.delta),
            "epsilon": encode_real(self.epsilon),
            "max_grad_norm": encode_real(self.max_grad_norm),
            "sampling": self.sampling,
            "dataset_fingerprint": self.dataset_fingerprint,
            "versions": dict(sorted(self.versions.items())),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> DpRecord:
        """Parse a record strictly: exactly the known keys, JSON types, canonical decimal strings, ranges.

        Args:
            obj: the parsed JSON value (``manifest["dp"][artifact]``).
            where: path for error messages, e.g. ``"manifest.dp.classifier"``.

        Returns:
            The record (its epsilon claim is *not* verified; see :func:`verify_claim`).

        Raises:
            PrivacyError: naming ``where`` and the field on any problem.
        """
        fields = _exact_keys(obj, _RECORD_FIELDS, where)
        values = {
            "accountant": fields["accountant"],
            "history": _history_from_json(fields["history"], f"{where}.history"),
            **{name: decode_real(fields[name], f"{where}.{name}") for name in ("delta", "epsilon", "max_grad_norm")},
            "sampling": fields["sampling"],
            "dataset_fingerprint": fields["dataset_fingerprint"],
            "versions": _versions_from_json(fields["versions"], f"{where}.versions"),
        }
        return cls(**_validated(values, where))


def _validated(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check every field's type and range; return the normalised values."""
    return {
        "accountant": _check_choice(values["accountant"], f"{where}.accountant", ACCOUNTANTS),
        "history": _check_history(values["history"], f"{where}.history"),
        "delta": _check_range(_as_real(values["delta"], f"{where}.delta"), f"{where}.delta", 0.0, 1.0,
                              high_inclusive=False),
        "epsilon": _positive(_as_real(values["epsilon"], f"{where}.epsilon"), f"{where}.epsilon"),
        "max_grad_norm": _positive(_as_real(values["max_grad_norm"], f"{where}.max_grad_norm"), f"{where}.max_grad_norm"),
        "sampling": _check_choice(values["sampling"], f"{where}.sampling", SAMPLING_MODES),
        "dataset_fingerprint": _check_pattern(values["dataset_fingerprint"], f"{where}.dataset_fingerprint",
                                              _FINGERPRINT_RE, "1..128 characters of [A-Za-z0-9._:/@+=-]"),
        "versions": _check_versions(values["versions"], f"{where}.versions"),
    }


def _exact_keys(obj: Any, names: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _malformed(where, f"must be a JSON object, got {type(obj).__name__}")
    problems = [f"{where}.{k}: required field is missing" for k in names if k not in obj]
    problems += [f"{where}.{k}: unknown field" for k in sorted(map(str, obj)) if k not in names]
    if problems:
        raise PrivacyError("malformed DP record: " + "; ".join(problems), hint=_MALFORMED_HINT)
    return obj


def _history_from_json(value: Any, path: str) -> list[tuple[float, float, int]]:
    if not isinstance(value, list):
        raise _malformed(path, f"must be a JSON array, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_HISTORY_ENTRIES:
        raise _malformed(path, f"must have 1..{MAX_HISTORY_ENTRIES} entries, got {len(value)}")
    return [_entry_from_json(entry, f"{path}[{i}]") for i, entry in enumerate(value)]


def _entry_from_json(value: Any, path: str) -> tuple[float, float, int]:
    entry = _exact_keys(value, _ENTRY_FIELDS, path)
    steps = entry["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise _malformed(f"{path}.steps", f"must be a JSON integer, got {type(steps).__name__}")
    sigma = decode_real(entry["noise_multiplier"], f"{path}.noise_multiplier")
    return _check_entry((sigma, decode_real(entry["sample_rate"], f"{path}.sample_rate"), steps), path)


def _versions_from_json(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _malformed(path, f"must be a JSON object, got {type(value).__name__}")
    return _check_versions(value, path)


# --- recomputation -------------------------------------------------------------------------------


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        why = " (gdp can underestimate epsilon and ignores all but the last history entry)" if accountant == "gdp" else ""
        raise PrivacyError(f"unknown or unsupported DP accountant {accountant!r}{why}; supported: {list(ACCOUNTANTS)}",
                           hint="train with Opacus's 'prv' or 'rdp' accountant")
    return str(accountant)


def _check_delta(delta: Any, path: str = "delta") -> float:
    return _check_range(_as_real(delta, path), path, 0.0, 1.0, high_inclusive=False)


def _check_recomputable(history: Sequence[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """Refuse values that make the accountants hang or crawl; return the history with equal pairs merged."""
    low, high = NOISE_MULTIPLIER_RANGE
    hint = "a history this far out gives no meaningful DP claim; do not trust it"
    for i, (sigma, rate, steps) in enumerate(history):
        if not low <= sigma <= high:
            raise PrivacyError(f"cannot recompute epsilon: history[{i}].noise_multiplier {sigma!r} is outside "
                               f"[{low:g}, {high:g}], where Opacus's analysis is reliable", hint=hint)
        if not SAMPLE_RATE_RANGE[0] <= rate <= SAMPLE_RATE_RANGE[1]:
            raise PrivacyError(f"cannot recompute epsilon: history[{i}].sample_rate {rate!r} is below "
                               f"{SAMPLE_RATE_RANGE[0]:g}", hint=hint)
        if steps > MAX_STEPS:
            raise PrivacyError(f"cannot recompute epsilon: history[{i}].steps {steps} is over {MAX_STEPS:g}", hint=hint)
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:  # composition is commutative: equal pairs add their steps
        merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
    if len(merged) > MAX_DISTINCT_ENTRIES:
        raise PrivacyError(f"cannot recompute epsilon: the history has {len(merged)} distinct (noise multiplier, "
                           f"sample rate) pairs, more than {MAX_DISTINCT_ENTRIES}", hint=hint)
    return tuple((sigma, rate, steps) for (sigma, rate), steps in merged.items())


def _rdp_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    accountant = accountant_class("rdp")()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def _prv_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Opacus's PRV upper bound, refused before any allocation when the discretisation would exceed the cell cap.

    The cap needs the discretisation domain first, and Opacus's ``get_epsilon`` computes
    that domain again (an RDP evaluation per history entry, the larger half of the work
    for a short history).  The accountant computes it once, with Opacus's own
    ``_get_domain``; ``get_epsilon`` then receives that very domain when it asks with
    the same arguments, and computes a new one for anything else.
    """
    delta_error = delta * PRV_DELTA_ERROR_RATIO
    accountant = accountant_class("prv")()
    accountant.history = list(history)
    analysis = prv_analysis()
    steps = [n for _, _, n in history]
    arguments = {"prvs": [analysis.PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                 "num_self_compositions": steps, "eps_error": PRV_EPS_ERROR, "delta_error": delta_error}
    compute_domain = accountant._get_domain
    domain = compute_domain(**arguments)
    cells = domain.size * len(history)   # discretisation points x entries: the float64 arrays Opacus allocates
    if not cells <= MAX_PRV_CELLS:
        raise PrivacyError(f"the PRV accountant would need {cells:.3g} cells (limit {MAX_PRV_CELLS}) for this history "
                           "(noise too small or training too long)", hint="recompute with the 'rdp' accountant")
    pairs = [(p.noise_multiplier, p.sample_rate) for p in arguments["prvs"]]

    def same_domain(*, prvs: Any, num_self_compositions: Any, eps_error: float, delta_error: float) -> Any:
        asked = ([(p.noise_multiplier, p.sample_rate) for p in prvs], list(num_self_compositions), eps_error, delta_error)
        if asked == (pairs, steps, PRV_EPS_ERROR, arguments["delta_error"]):
            return domain
        return compute_domain(prvs=prvs, num_self_compositions=num_self_compositions, eps_error=eps_error, delta_error=delta_error)

    accountant._get_domain = same_domain
    return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error))


def compute_epsilon(accountant: str, history: Iterable[Sequence[Any]], delta: float) -> float:
    """Recompute epsilon from an accountant history with Opacus (a pure function of its inputs).

    Uses the pinned settings :data:`RDP_ORDERS` (RDP) and :data:`PRV_EPS_ERROR`,
    :data:`PRV_DELTA_ERROR_RATIO` (PRV; the upper bound is returned).  The result
    assumes Poisson subsampling.  A negative RDP conversion (only at huge delta) is
    reported as ``0.0``; a NaN as ``inf``.

    Args:
        accountant: ``"rdp"`` or ``"prv"``.
        history: ``(noise_multiplier, sample_rate, steps)`` entries, in training order.
        delta: target delta, ``0 < delta < 1``.

    Returns:
        Epsilon at ``delta``.

    Raises:
        PrivacyError: unknown accountant ("gdp" included), a malformed history or delta,
            a noise multiplier outside :data:`NOISE_MULTIPLIER_RANGE`, a sample rate below
            :data:`SAMPLE_RATE_RANGE`, steps over :data:`MAX_STEPS`, more than
            :data:`MAX_DISTINCT_ENTRIES` distinct pairs, a history too expensive for PRV,
            or a numerical failure inside Opacus.
    """
    name = _check_accountant(accountant)
    entries = _check_history(history, "history")
    target = _check_delta(delta)
    return _epsilon_of(name, _check_recomputable(entries), target)


@contextlib.contextmanager
def quiet_accountant() -> Iterator[None]:
    """Silence what Opacus's accountants say on the way to a correct epsilon, and only that.

    * NumPy's "divide by zero encountered in log": at sample rate 1 (a site with fewer records than the
      logical batch, a one-shot release) the PRV analysis takes log(1 - q) = -inf on purpose.
    * "Optimal order is the largest/smallest alpha": Opacus sizes the PRV domain with an RDP bound over its
      default orders, and says so for heavily noised steps (a label histogram at sigma 35) and for the trial
      noise levels of a noise search.  It is about the domain's size, which PRV_EPS_ERROR bounds; where it is
      the RDP epsilon itself, the bound is conservative, never optimistic.
    """
    import numpy as np   # with the accountants, not with every policy read

    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


@functools.lru_cache(maxsize=256)
def _epsilon_of(name: str, entries: tuple[tuple[float, float, int], ...], target: float) -> float:
    """:func:`compute_epsilon` of a checked history, remembered: a pure function of its arguments (the whole
    history is the key), and every DP record is verified several times in one process (each export's policy
    check, each ingest, each load of an accepted bundle), at seconds of accounting each.  Errors are not kept."""
    try:
        with quiet_accountant():
            epsilon = (_rdp_epsilon if name == "rdp" else _prv_epsilon)(entries, target)
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as e:
        raise PrivacyError(f"cannot recompute epsilon with the {name} accountant: {e}",
                           hint="check the DP record's history; try the 'rdp' accountant") from e
    return max(epsilon, 0.0) if not math.isnan(epsilon) else math.inf


def verify_claim(record: DpRecord, rel_tol: float = 0.01, abs_tol: float = 1e-3) -> float:
    """Recompute a record's epsilon and check its claim (``math.isclose`` with these tolerances).

    A claim that disagrees in either direction is refused: lower understates the
    privacy loss; higher means the record was not produced by this history and
    accountant.  The recomputation is only meaningful for Poisson sampling (see
    the module docstring); the policy layer checks ``record.sampling``.

    Args:
        record: the site's record.
        rel_tol: relative tolerance (default 1%, covering library-version drift).
        abs_tol: absolute tolerance (default 0.001).

    Returns:
        The recomputed epsilon (use it, not the claim).

    Raises:
        ValueError: a tolerance is negative (a caller bug).
        PrivacyError: the claim disagrees ("may be forged"), the history gives no finite
            epsilon, or the recomputation fails.
    """
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError("tolerances must be >= 0")
    recomputed = compute_epsilon(record.accountant, record.history, record.delta)
    if not math.isfinite(recomputed):
        raise PrivacyError(f"the DP history gives no finite epsilon at delta {record.delta:g}; "
                           f"the claimed epsilon {record.epsilon:g} may be forged")
    if not math.isclose(record.epsilon, recomputed, rel_tol=rel_tol, abs_tol=abs_tol):
        raise PrivacyError(_mismatch_message(record, recomputed, rel_tol, abs_tol),
                           hint="do not trust this artifact's DP claim; ask the site to re-export with its accountant history")
    return recomputed


def _mismatch_message(record: DpRecord, recomputed: float, rel_tol: float, abs_tol: float) -> str:
    direction = "understates" if record.epsilon < recomputed else "overstates"
    opacus = record.versions.get("opacus", "unknown")
    return (f"claimed epsilon {record.epsilon:.6g} disagrees with the recomputed {recomputed:.6g} "
            f"({record.accountant}, delta {record.delta:g}, tolerance rel {rel_tol:g} / abs {abs_tol:g}): "
            f"the claim {direction} the privacy loss and may be forged "
            f"(or was computed with another accountant; site's opacus {opacus})")


# --- per-bundle bound ---------------------------------------------------------------------------


def check_bundle_history(dp: Mapping[str, Any]) -> int:
    """Count the history entries of every DP record in a bundle; refuse more than the bundle cap.

    Callers run this on the manifest's ``dp`` object *before* parsing or recomputing
    any record, so a bundle cannot make the verifier parse or account for more than
    :data:`MAX_BUNDLE_HISTORY_ENTRIES` entries in all.  Values may be raw JSON
    objects (their ``history`` array is counted, anything else counts 0 and is left
    to :meth:`DpRecord.from_json` to refuse) or :class:`DpRecord` instances.

    Args:
        dp: artifact name -> DP record (raw JSON or parsed).

    Returns:
        The total number of history entries.

    Raises:
        PrivacyError: the total exceeds :data:`MAX_BUNDLE_HISTORY_ENTRIES`.
    """
    if not isinstance(dp, Mapping):
        raise _malformed("dp", f"must be a JSON object, got {type(dp).__name__}")
    total = 0
    for record in dp.values():
        history = record.history if isinstance(record, DpRecord) else (
            record.get("history") if isinstance(record, Mapping) else None)
        total += len(history) if isinstance(history, (list, tuple)) else 0
    if total > MAX_BUNDLE_HISTORY_ENTRIES:
        raise PrivacyError(f"the bundle's DP records carry {total} history entries in all, more than "
                           f"{MAX_BUNDLE_HISTORY_ENTRIES}", hint=_MALFORMED_HINT)
    return total


# --- composition ---------------------------------------------------------------------------------


def composed_epsilon(records: Sequence[DpRecord], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of releasing all ``records``' artifacts, trained on the same records.

    The histories are concatenated into one accountant (RDP composes by adding RDP
    curves; PRV convolves heterogeneous privacy-loss variables) and evaluated at
    ``delta``.  Each record's own accountant and claim are ignored here.

    Records with different ``dataset_fingerprint`` values are a **caller error**
    (``ValueError``): they are about different data, and whether those data overlap
    (sequential composition) or are disjoint (parallel composition) is not something
    a fingerprint can tell.  Group them first with :func:`group_by_dataset`.

    Args:
        records: one or more records with the same ``dataset_fingerprint``.
        delta: target delta of the composition (e.g. the sum of the records' deltas).
        accountant: ``"rdp"`` (default) or ``"prv"``.

    Returns:
        The composed epsilon at ``delta``.

    Raises:
        ValueError: ``records`` is empty or mixes dataset fingerprints (caller bugs).
        PrivacyError: unknown accountant, bad delta, or a failed recomputation.
    """
    if not records:
        raise ValueError("composed_epsilon needs at least one record")
    fingerprints = sorted({r.dataset_fingerprint for r in records})
    if len(fingerprints) > 1:
        raise ValueError(f"records from different datasets {fingerprints} do not compose sequentially; "
                         "group them with group_by_dataset() first")
    history = [entry for record in records for entry in record.history]
    return compute_epsilon(accountant, history, delta)


def group_by_dataset(records: Mapping[str, DpRecord]) -> dict[str, list[str]]:
    """Group artifact names by the dataset their record was trained on.

    Args:
        records: artifact name -> record.

    Returns:
        ``{fingerprint: sorted artifact names}``, fingerprints sorted, independent of dict order.
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(records):
        groups.setdefault(records[name].dataset_fingerprint, []).append(name)
    return dict(sorted(groups.items()))


# --- from training -------------------------------------------------------------------------------


def _library_versions() -> dict[str, str]:
    import numpy as np
    import opacus
    import scipy
    import torch

    return {"opacus": str(opacus.__version__), "torch": str(torch.__version__),
            "numpy": str(np.__version__), "scipy": str(scipy.__version__)}


def dp_record_from_opacus(accountant: Any, *, delta: float, max_grad_norm: float, sampling: str,
                          dataset_fingerprint: str, versions: Mapping[str, str] | None = None) -> DpRecord:
    """Build a record from a live Opacus accountant after training.

    The history is copied and epsilon is computed with :func:`compute_epsilon` (the
    pinned settings the verifier uses), not with the accountant's own defaults.

    Args:
        accountant: an Opacus ``IAccountant`` (``PrivacyEngine.accountant``), "rdp" or "prv".
        delta: target delta.
        max_grad_norm: the clipping norm used by the optimizer.
        sampling: one of :data:`SAMPLING_MODES` (Opacus's analysis assumes "poisson").
        dataset_fingerprint: identifies the training records.
        versions: library versions to record; default: opacus, torch, numpy, scipy in use.

    Returns:
        A validated record whose claim :func:`verify_claim` accepts.

    Raises:
        PrivacyError: a GDP or unknown accountant, no training steps, no finite epsilon,
            or a field out of range.
    """
    name = _check_accountant(accountant.mechanism())
    history = tuple(tuple(entry) for entry in accountant.history)
    if not history:
        raise PrivacyError("the accountant recorded no training steps", hint="build the record after training")
    epsilon = compute_epsilon(name, history, delta)
    if not 0 < epsilon < math.inf:
        raise PrivacyError(f"the training history gives epsilon {epsilon} at delta {delta}: no usable DP guarantee")
    return DpRecord(name, history, delta, epsilon, max_grad_norm, sampling, dataset_fingerprint,  # type: ignore[arg-type]
                    dict(versions) if versions is not None else _library_versions())

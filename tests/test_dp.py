"""DP records: known-answer epsilons, slow independent references, strict parsing, claims, composition.

The known answers were obtained once by calling Opacus 1.6.0 directly
(``create_accountant(m); acc.history = h; acc.get_epsilon(1e-5)``, default
settings) and are cross-checked below against references that do not use Opacus:

* RDP at sample rate 1 (no subsampling): the Gaussian mechanism's RDP is
  ``alpha / (2 sigma^2)`` per step, composed by adding, converted with Balle et
  al. 2020 Thm 21 over the same order grid;
* RDP at sample rate < 1: the exact integer-order binomial expansion of the
  subsampled Gaussian (Mironov, Talwar, Zhang 2019), over integer orders only;
* PRV at sample rate 1: T Gaussian steps are one mu-GDP mechanism with
  ``mu = sqrt(T) / sigma``, whose exact (eps, delta) curve is
  ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Balle & Wang 2018).
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_oneshot._internal.encoding import canonical_json, parse_strict_json
from secure_oneshot.errors import PrivacyError
from secure_oneshot.policy import dp as dp_module
from secure_oneshot.policy.dp import (
    ACCOUNTANTS,
    MAX_HISTORY_ENTRIES,
    PRV_EPS_ERROR,
    DpRecord,
    composed_epsilon,
    compute_epsilon,
    decode_real,
    dp_record_from_opacus,
    encode_real,
    group_by_dataset,
    verify_claim,
)

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the (smallest|largest) alpha:UserWarning")

DELTA = 1e-5
WHERE = "manifest.dp.classifier"
HISTORIES = {
    "dpsgd-500": ((1.1, 0.01, 500),),
    "full-batch-10": ((1.0, 1.0, 10),),
    "two-phase": ((0.8, 0.004, 2000), (1.5, 0.02, 100)),
}
# (accountant, history name) -> epsilon at delta 1e-5, from Opacus 1.6.0 called directly.
PINNED = {
    ("rdp", "dpsgd-500"): 1.3208673116394032,
    ("rdp", "full-batch-10"): 19.05359753163139,
    ("rdp", "two-phase"): 2.2772605356085958,
    ("prv", "dpsgd-500"): 1.092681562326454,
    ("prv", "full-batch-10"): 17.86730414930238,
    ("prv", "two-phase"): 1.7675613364457534,
}


def make_record(**changes: Any) -> DpRecord:
    fields: dict[str, Any] = dict(
        accountant="rdp", history=HISTORIES["dpsgd-500"], delta=DELTA, epsilon=PINNED[("rdp", "dpsgd-500")],
        max_grad_norm=1.0, sampling="poisson", dataset_fingerprint="sha256:" + "ab" * 32,
        versions={"opacus": "1.6.0", "torch": "2.3.0+cu121"},
    )
    fields.update(changes)
    return DpRecord(**fields)


# --- slow references (no Opacus) -------------------------------------------------------------------

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _rdp_to_dp(rdp: float, alpha: float, delta: float) -> float:
    """Balle et al. 2020, Thm 21 (the conversion Opacus uses)."""
    return rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)


def reference_rdp_full_batch(sigma: float, steps: int, delta: float) -> float:
    return min(_rdp_to_dp(steps * alpha / (2 * sigma**2), alpha, delta) for alpha in ORDERS)


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _rdp_subsampled_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order: log(sum_k C(a,k)(1-q)^(a-k) q^k e^((k^2-k)/2s^2))/(a-1)."""
    terms = [math.log(math.comb(alpha, k)) + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    return _logsumexp(terms) / (alpha - 1)


def reference_rdp_integer_orders(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    def total(alpha: int) -> float:
        return sum(steps * _rdp_subsampled_integer(q, sigma, alpha) for sigma, q, steps in history)
    return min(_rdp_to_dp(total(alpha), alpha, delta) for alpha in range(2, 64))


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def reference_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP (Gaussian) mechanism at delta, by bisection."""
    def delta_of(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)
    low, high = 0.0, 1.0
    while delta_of(high) > delta:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


# --- known answers and references ------------------------------------------------------------------


@pytest.mark.parametrize(("accountant", "name"), sorted(PINNED))
def test_known_answer(accountant: str, name: str) -> None:
    assert compute_epsilon(accountant, HISTORIES[name], DELTA) == pytest.approx(PINNED[(accountant, name)], rel=1e-6)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 10), (0.5, 1), (2.0, 50), (5.0, 3), (20.0, 1)])
def test_rdp_matches_closed_form_without_subsampling(sigma: float, steps: int) -> None:
    fast = compute_epsilon("rdp", [(sigma, 1.0, steps)], DELTA)
    assert fast == pytest.approx(reference_rdp_full_batch(sigma, steps, DELTA), rel=1e-12)


@pytest.mark.parametrize("history", [((1.1, 0.01, 500),), ((0.8, 0.004, 2000), (1.5, 0.02, 100)), ((1.0, 0.5, 3),)])
def test_rdp_is_no_looser_than_integer_order_reference(history: tuple[tuple[float, float, int], ...]) -> None:
    # The fast path searches a superset of the integer orders, so it is <= the reference, and close to it.
    fast, slow = compute_epsilon("rdp", history, DELTA), reference_rdp_integer_orders(history, DELTA)
    assert fast <= slow + 1e-9
    assert slow <= fast * 1.05


def test_rdp_equals_integer_order_reference_when_the_best_order_is_an_integer() -> None:
    history = ((1.5, 0.02, 300),)  # best order is an integer >= 12, where the grids coincide
    assert compute_epsilon("rdp", history, DELTA) == pytest.approx(reference_rdp_integer_orders(history, DELTA), rel=1e-9)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 10), (0.5, 1), (2.0, 50), (5.0, 3)])
def test_prv_brackets_the_exact_gaussian_without_subsampling(sigma: float, steps: int) -> None:
    exact = reference_gaussian_epsilon(math.sqrt(steps) / sigma, DELTA)
    prv = compute_epsilon("prv", [(sigma, 1.0, steps)], DELTA)
    assert exact <= prv <= exact + 2 * PRV_EPS_ERROR  # PRV returns an upper bound within its error


@pytest.mark.parametrize("name", sorted(HISTORIES))
def test_prv_is_tighter_than_rdp(name: str) -> None:
    assert compute_epsilon("prv", HISTORIES[name], DELTA) <= compute_epsilon("rdp", HISTORIES[name], DELTA) + PRV_EPS_ERROR


def test_accountants_exclude_gdp() -> None:
    assert ACCOUNTANTS == ("rdp", "prv")
    with pytest.raises(PrivacyError, match="gdp") as info:
        compute_epsilon("gdp", HISTORIES["dpsgd-500"], DELTA)
    assert info.value.exit_code == 8
    with pytest.raises(PrivacyError, match="unsupported DP accountant 'moments'"):
        compute_epsilon("moments", HISTORIES["dpsgd-500"], DELTA)


def test_a_heavily_noised_release_is_accounted_without_a_warning() -> None:
    # a DP site's classifier history: DP-SGD, then its label histogram (sigma 35) and decision threshold; the PRV
    # domain's RDP sizing said "Optimal order is the largest alpha" for it, once per hospital and pass
    history = ((1.2353515625, 0.1111111111111111, 135), (35.0, 1.0, 1), (4.6484375, 1.0, 1))
    dp_module._epsilon_of.cache_clear()   # an earlier test's result would answer without running the accountant
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epsilon = compute_epsilon("prv", history, 1e-5)
    assert not [w for w in caught if "Optimal order" in str(w.message)]
    assert 6.0 < epsilon <= compute_epsilon("rdp", history, 1e-5)   # a real epsilon, below the looser RDP bound


def test_huge_delta_is_reported_as_zero_not_negative() -> None:
    assert compute_epsilon("rdp", [(1.0, 0.01, 10)], 0.999) == 0.0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("sigma", [1e-160, 1e-200, 9e-4, 1.1e4])
def test_noise_multiplier_outside_the_reliable_range_is_refused(accountant: str, sigma: float) -> None:
    # Regression: at sigma 1e-160 Opacus's RDP series never terminates (sigma**2 underflows).
    with pytest.raises(PrivacyError, match=re.escape("history[1].noise_multiplier")):
        compute_epsilon(accountant, [(1.0, 0.01, 10), (sigma, 0.5, 1)], DELTA)


@pytest.mark.parametrize("history", [[(0.01, 0.01, 10)], [(1e-3, 0.5, 1)], [(1.0, 0.01, 10**6)]])
def test_prv_refuses_histories_too_expensive_to_recompute(history: list[tuple[float, float, int]]) -> None:
    with pytest.raises(PrivacyError, match="cells"):  # before: minutes of CPU, or a 2.5 PiB allocation
        compute_epsilon("prv", history, DELTA)


def test_opacus_numerical_failure_is_a_privacy_error() -> None:
    with pytest.raises(PrivacyError, match="cannot recompute epsilon with the prv accountant"):
        compute_epsilon("prv", [(1.0, 0.01, 10)], 1e-300)


@pytest.mark.parametrize(("history", "delta", "path"), [
    ([], DELTA, "history"), ([(0.0, 0.01, 1)], DELTA, "history[0].noise_multiplier"),
    ([(1.0, 0.01, 0)], DELTA, "history[0].steps"), ([(1.0, 0.01, 1)], 0.0, "delta"), ([(1.0, 0.01, 1)], 1.0, "delta"),
])
def test_compute_epsilon_validates_its_inputs(history: list[Any], delta: float, path: str) -> None:
    with pytest.raises(PrivacyError, match=re.escape(path)):
        compute_epsilon("rdp", history, delta)


# --- decimal strings -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [(1e-5, "1e-05"), (1.1, "1.1"), (500, "500.0"), (0.01, "0.01"), (1e16, "1e+16")])
def test_encode_real(value: float, text: str) -> None:
    assert encode_real(value) == text
    assert decode_real(text, "x") == float(value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_real_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError):
        encode_real(bad)


def test_encode_real_rejects_non_reals() -> None:
    with pytest.raises(TypeError):
        encode_real(True)
    with pytest.raises(TypeError):
        encode_real("1.0")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    "", " 1.0", "1.0 ", "nan", "NaN", "inf", "Infinity", "-inf", "1e999", "0x1p3", "1_000.0", "+1.0", ".5", "1.",
    "1e", "\u0661.\u0665", "0.00001", "1.10", "01.1", "1E-05", 1.1, 1, None, True, ["1.1"],
])
def test_decode_real_is_strict(bad: Any) -> None:
    with pytest.raises(PrivacyError, match=r"^malformed DP record: a\.b: "):
        decode_real(bad, "a.b")


def test_decode_real_non_canonical_mode_still_rejects_garbage() -> None:
    assert decode_real("0.00001", "x", canonical=False) == 1e-5
    with pytest.raises(PrivacyError):
        decode_real(" 1.0", "x", canonical=False)


# --- round trip and strict parsing ------------------------------------------------------------------


def test_round_trip_and_canonical_json() -> None:
    record = make_record(history=HISTORIES["two-phase"])
    data = record.to_json()
    assert DpRecord.from_json(data, WHERE) == record
    raw = canonical_json(data)  # raises if a float leaked
    assert DpRecord.from_json(parse_strict_json(raw, canonical=True), WHERE).to_json() == data
    assert data["history"][0] == {"noise_multiplier": "0.8", "sample_rate": "0.004", "steps": 2000}
    assert data["delta"] == "1e-05"


reals = st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False)
rates = st.floats(min_value=1e-9, max_value=1.0, allow_nan=False)
entries = st.tuples(reals, rates, st.integers(1, 2**53 - 1))
records = st.builds(
    DpRecord, accountant=st.sampled_from(ACCOUNTANTS), history=st.lists(entries, min_size=1, max_size=4).map(tuple),
    delta=st.floats(min_value=1e-300, max_value=0.999), epsilon=reals, max_grad_norm=reals,
    sampling=st.sampled_from(("poisson", "shuffle", "fixed")), dataset_fingerprint=st.from_regex(r"[a-z0-9:]{1,40}", fullmatch=True),
    versions=st.dictionaries(st.from_regex(r"[a-z]{1,10}", fullmatch=True), st.from_regex(r"[0-9.+a-z]{1,12}", fullmatch=True), max_size=4),
)


@settings(max_examples=50, deadline=None)
@given(records)
def test_round_trip_property(record: DpRecord) -> None:
    data = record.to_json()
    assert DpRecord.from_json(parse_strict_json(canonical_json(data), canonical=True), WHERE) == record
    assert DpRecord.from_json(data, WHERE).to_json() == data  # accepted JSON re-serialises identically


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__delitem__(key)


def _entry(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    return lambda d: change(d["history"][0])


MUTATIONS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    *[(f"missing {k}", _drop(k), f"{WHERE}.{k}: required field is missing")
      for k in ("accountant", "history", "delta", "epsilon", "max_grad_norm", "sampling", "dataset_fingerprint", "versions")],
    *[(f"missing entry {k}", _entry(_drop(k)), f"{WHERE}.history[0].{k}: required field is missing")
      for k in ("noise_multiplier", "sample_rate", "steps")],
    ("extra key", _set("clip", "1.0"), f"{WHERE}.clip: unknown field"),
    ("extra entry key", _entry(_set("epochs", 1)), f"{WHERE}.history[0].epochs: unknown field"),
    ("accountant int", _set("accountant", 1), f"{WHERE}.accountant"),
    ("accountant gdp", _set("accountant", "gdp"), f"{WHERE}.accountant"),
    ("accountant upper", _set("accountant", "RDP"), f"{WHERE}.accountant"),
    ("history object", _set("history", {}), f"{WHERE}.history"),
    ("history empty", _set("history", []), f"{WHERE}.history"),
    ("history too long", lambda d: d.__setitem__("history", d["history"] * (MAX_HISTORY_ENTRIES + 1)), f"{WHERE}.history"),
    ("entry not object", _set("history", [["1.1", "0.01", 500]]), f"{WHERE}.history[0]"),
    ("steps string", _entry(_set("steps", "500")), f"{WHERE}.history[0].steps"),
    ("steps float", _entry(_set("steps", 500.0)), f"{WHERE}.history[0].steps"),
    ("steps bool", _entry(_set("steps", True)), f"{WHERE}.history[0].steps"),
    ("steps zero", _entry(_set("steps", 0)), f"{WHERE}.history[0].steps"),
    ("steps huge", _entry(_set("steps", 2**53)), f"{WHERE}.history[0].steps"),
    ("sigma float", _entry(_set("noise_multiplier", 1.1)), f"{WHERE}.history[0].noise_multiplier"),
    ("sigma zero", _entry(_set("noise_multiplier", "0.0")), f"{WHERE}.history[0].noise_multiplier"),
    ("sigma negative", _entry(_set("noise_multiplier", "-1.1")), f"{WHERE}.history[0].noise_multiplier"),
    ("rate zero", _entry(_set("sample_rate", "0.0")), f"{WHERE}.history[0].sample_rate"),
    ("rate above one", _entry(_set("sample_rate", "1.5")), f"{WHERE}.history[0].sample_rate"),
    ("rate nan", _entry(_set("sample_rate", "nan")), f"{WHERE}.history[0].sample_rate"),
    ("delta float", _set("delta", 1e-05), f"{WHERE}.delta"),
    ("delta zero", _set("delta", "0.0"), f"{WHERE}.delta"),
    ("delta one", _set("delta", "1.0"), f"{WHERE}.delta"),
    ("delta non-canonical", _set("delta", "0.00001"), f"{WHERE}.delta"),
    ("epsilon nan", _set("epsilon", "nan"), f"{WHERE}.epsilon"),
    ("epsilon inf", _set("epsilon", "inf"), f"{WHERE}.epsilon"),
    ("epsilon zero", _set("epsilon", "0.0"), f"{WHERE}.epsilon"),
    ("epsilon padded", _set("epsilon", " 1.0"), f"{WHERE}.epsilon"),
    ("epsilon null", _set("epsilon", None), f"{WHERE}.epsilon"),
    ("clip negative", _set("max_grad_norm", "-1.0"), f"{WHERE}.max_grad_norm"),
    ("clip zero", _set("max_grad_norm", "0.0"), f"{WHERE}.max_grad_norm"),
    ("sampling unknown", _set("sampling", "random"), f"{WHERE}.sampling"),
    ("sampling int", _set("sampling", 3), f"{WHERE}.sampling"),
    ("fingerprint empty", _set("dataset_fingerprint", ""), f"{WHERE}.dataset_fingerprint"),
    ("fingerprint space", _set("dataset_fingerprint", "a b"), f"{WHERE}.dataset_fingerprint"),
    ("fingerprint int", _set("dataset_fingerprint", 7), f"{WHERE}.dataset_fingerprint"),
    ("versions list", _set("versions", []), f"{WHERE}.versions"),
    ("versions value int", _set("versions", {"opacus": 1}), f"{WHERE}.versions.opacus"),
    ("versions empty key", _set("versions", {"": "1.6.0"}), f"{WHERE}.versions key"),
]


@pytest.mark.parametrize(("change", "path"), [(m[1], m[2]) for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_from_json_rejects(change: Callable[[dict[str, Any]], None], path: str) -> None:
    data = make_record().to_json()
    change(data)
    with pytest.raises(PrivacyError, match=re.escape(path)) as info:
        DpRecord.from_json(data, WHERE)
    assert info.value.exit_code == 8


@pytest.mark.parametrize("bad", [[], "record", None, 1])
def test_from_json_rejects_non_objects(bad: Any) -> None:
    with pytest.raises(PrivacyError, match=re.escape(f"{WHERE}: must be a JSON object")):
        DpRecord.from_json(bad, WHERE)


def test_non_poisson_records_parse() -> None:
    record = make_record(sampling="shuffle")
    assert DpRecord.from_json(record.to_json(), WHERE).sampling == "shuffle"


def test_constructor_validates_and_normalises() -> None:
    record = make_record(history=[[2, 1, 3]])
    assert record.history == ((2.0, 1.0, 3),) and isinstance(record.history[0][0], float)
    assert hash(record) == hash(make_record(history=((2.0, 1.0, 3),)))
    with pytest.raises(PrivacyError, match=re.escape("DpRecord.delta")):
        make_record(delta=1.5)
    with pytest.raises(PrivacyError, match=re.escape("DpRecord.history[0].steps")):
        make_record(history=((1.0, 0.5, 2.5),))
    with pytest.raises(PrivacyError, match=re.escape("DpRecord.epsilon")):
        make_record(epsilon=True)


# --- claims ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_honest_claim_passes(accountant: str) -> None:
    claim = PINNED[(accountant, "dpsgd-500")]
    recomputed = verify_claim(make_record(accountant=accountant, epsilon=claim))
    assert recomputed == pytest.approx(claim, rel=1e-9)
    verify_claim(make_record(accountant=accountant, epsilon=claim * 1.009))  # within the 1% tolerance


@pytest.mark.parametrize(("factor", "direction"), [(0.95, "understates"), (1.05, "overstates"), (0.5, "understates")])
def test_disagreeing_claim_is_refused(factor: float, direction: str) -> None:
    claim = PINNED[("rdp", "dpsgd-500")] * factor
    with pytest.raises(PrivacyError, match=f"{direction} the privacy loss and may be forged") as info:
        verify_claim(make_record(epsilon=claim))
    assert f"claimed epsilon {claim:.6g}" in info.value.message
    assert "recomputed 1.32087" in info.value.message


def test_claim_is_checked_against_its_own_accountant() -> None:
    # An RDP epsilon labelled "prv" is 20% too high for PRV: refused.
    with pytest.raises(PrivacyError, match="forged"):
        verify_claim(make_record(accountant="prv", epsilon=PINNED[("rdp", "dpsgd-500")]))


def test_absolute_tolerance_applies_near_zero() -> None:
    record = make_record(history=((50.0, 0.001, 1),), epsilon=1.0)
    recomputed = compute_epsilon("rdp", record.history, DELTA)
    verify_claim(make_record(history=record.history, epsilon=recomputed + 5e-4), rel_tol=0.0)
    with pytest.raises(PrivacyError):
        verify_claim(make_record(history=record.history, epsilon=recomputed + 5e-3), rel_tol=0.0)


def test_history_outside_the_reliable_range_is_refused() -> None:
    with pytest.raises(PrivacyError, match="cannot recompute"):
        verify_claim(make_record(history=((1e-200, 1.0, 1),), epsilon=1.0))


def test_negative_tolerance_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        verify_claim(make_record(), rel_tol=-0.1)


# --- composition -----------------------------------------------------------------------------------

CLASSIFIER = ((1.1, 0.01, 500),)
GENERATOR = ((1.5, 0.02, 300),)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_composition_of_two_artifacts_on_the_same_records(accountant: str) -> None:
    classifier = make_record(history=CLASSIFIER)
    generator = make_record(history=GENERATOR, epsilon=PINNED[("rdp", "dpsgd-500")])
    composed = composed_epsilon([classifier, generator], DELTA, accountant)
    alone = [compute_epsilon(accountant, h, DELTA) for h in (CLASSIFIER, GENERATOR)]
    assert composed > max(alone)
    # Basic composition: (e1, d/2) and (e2, d/2) give (e1 + e2, d); the accountant must be no looser.
    assert composed <= sum(compute_epsilon(accountant, h, DELTA / 2) for h in (CLASSIFIER, GENERATOR))


def test_rdp_composition_adds_steps() -> None:
    record = make_record(history=CLASSIFIER)
    twice = composed_epsilon([record, record], DELTA)
    assert twice == pytest.approx(compute_epsilon("rdp", [(1.1, 0.01, 1000)], DELTA), rel=1e-12)
    assert composed_epsilon([record], DELTA) == compute_epsilon("rdp", CLASSIFIER, DELTA)


def test_composition_refuses_different_datasets() -> None:
    a, b = make_record(dataset_fingerprint="site-a:v1"), make_record(dataset_fingerprint="site-a:v2")
    with pytest.raises(ValueError, match="group_by_dataset"):
        composed_epsilon([a, b], DELTA)
    with pytest.raises(ValueError):
        composed_epsilon([], DELTA)
    with pytest.raises(PrivacyError, match="gdp"):
        composed_epsilon([a], DELTA, accountant="gdp")


def test_group_by_dataset_is_order_independent() -> None:
    a, b = make_record(dataset_fingerprint="fp-b"), make_record(dataset_fingerprint="fp-a")
    records = {"generator": a, "dp_feature_statistics": b, "classifier": a}
    expected = {"fp-a": ["dp_feature_statistics"], "fp-b": ["classifier", "generator"]}
    assert group_by_dataset(records) == expected
    assert list(group_by_dataset(dict(reversed(list(records.items()))))) == ["fp-a", "fp-b"]


# --- from a live Opacus accountant ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ACCOUNTANTS)
def test_record_from_opacus_verifies(mechanism: str) -> None:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism)
    for _ in range(300):
        accountant.step(noise_multiplier=1.2, sample_rate=0.01)
    for _ in range(50):
        accountant.step(noise_multiplier=2.0, sample_rate=0.02)
    record = dp_record_from_opacus(accountant, delta=DELTA, max_grad_norm=1.0, sampling="poisson",
                                   dataset_fingerprint="site-a:train")
    assert record.history == ((1.2, 0.01, 300), (2.0, 0.02, 50))
    assert record.versions["opacus"] == "1.6.0"
    assert verify_claim(record) == record.epsilon
    assert DpRecord.from_json(record.to_json(), WHERE) == record


def test_record_from_opacus_refuses_gdp_and_empty_history() -> None:
    from opacus.accountants import create_accountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gdp = create_accountant("gdp")
    gdp.step(noise_multiplier=1.0, sample_rate=0.01)
    with pytest.raises(PrivacyError, match="gdp"):
        dp_record_from_opacus(gdp, delta=DELTA, max_grad_norm=1.0, sampling="poisson", dataset_fingerprint="x")
    with pytest.raises(PrivacyError, match="no training steps"):
        dp_record_from_opacus(create_accountant("rdp"), delta=DELTA, max_grad_norm=1.0, sampling="poisson",
                              dataset_fingerprint="x")


# --- monotonicity (hypothesis) -------------------------------------------------------------------

def small_entries(max_rate: float) -> st.SearchStrategy[tuple[float, float, int]]:
    rates = st.floats(min_value=1e-3, max_value=0.05)
    if max_rate == 1.0:
        rates = rates | st.just(1.0)
    return st.tuples(st.floats(min_value=0.7, max_value=4.0), rates, st.integers(min_value=1, max_value=300))


# RDP is monotone up to float rounding; PRV's upper bound is within 2 * eps_error of the true epsilon.
# PRV skips sample rate 1 here (its cost grows with epsilon); the Gaussian reference above covers it.
SLACK = {"rdp": 1e-9, "prv": 2 * PRV_EPS_ERROR + 1e-9}
HISTORY_STRATEGY = {name: st.lists(small_entries(1.0 if name == "rdp" else 0.05), min_size=1, max_size=2) for name in ACCOUNTANTS}


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@settings(max_examples=30, deadline=None)
@given(data=st.data(), which=st.integers(0, 1), more_noise=st.floats(min_value=1.0, max_value=3.0),
       more_steps=st.integers(min_value=0, max_value=300))
def test_epsilon_is_monotone(accountant: str, data: st.DataObject, which: int, more_noise: float, more_steps: int) -> None:
    history = data.draw(HISTORY_STRATEGY[accountant], label="history")
    i = which % len(history)
    sigma, q, steps = history[i]
    base = compute_epsilon(accountant, history, DELTA)
    noisier = compute_epsilon(accountant, history[:i] + [(sigma * more_noise, q, steps)] + history[i + 1:], DELTA)
    longer = compute_epsilon(accountant, history[:i] + [(sigma, q, steps + more_steps)] + history[i + 1:], DELTA)
    slack = SLACK[accountant] * (1 if accountant == "prv" else max(1.0, base))
    assert noisier <= base + slack
    assert longer >= base - slack

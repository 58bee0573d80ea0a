"""Fuzz the bundle reader with the mutators of ``benchmarks/fuzz_bundles.py`` (bounded: a few seconds).

Every mutant differs from a valid bundle, so every one must be refused, and
only with a ``SecureOneshotError``: any other exception escaping
``inspect_bundle``/``open_bundle`` is a bug (a traceback instead of a reason).
The benchmark runs the same mutators 20,000 times (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import random
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_oneshot._internal.encoding import parse_strict_json
from secure_oneshot.bundle import open_bundle, parse_payload
from secure_oneshot.errors import SecureOneshotError, TensorPayloadError

_SPEC = importlib.util.spec_from_file_location("fuzz_bundles", Path(__file__).parents[1] / "benchmarks" / "fuzz_bundles.py")
assert _SPEC is not None and _SPEC.loader is not None
fuzz = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("fuzz_bundles", fuzz)  # dataclasses look their module up while the file executes
_SPEC.loader.exec_module(fuzz)

PER_MUTATOR = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fuzz.build_corpus(tmp_path_factory.mktemp("corpus"))


def _tally():
    return fuzz.Tally(fuzz.collections.Counter(), [], [])


def test_the_corpus_opens(corpus, tmp_path: Path) -> None:
    """The oracle is only meaningful if the unmutated bundles are accepted."""
    for i, data in enumerate(corpus.bundles):
        path = tmp_path / f"ok{i}.sob"
        path.write_bytes(data)
        assert open_bundle(path, corpus.server, corpus.trust, now=fuzz.NOW).tensors


@pytest.mark.parametrize("name", sorted(fuzz.MUTATORS))
def test_every_mutator_is_refused_with_a_library_error(corpus, tmp_path: Path, name: str) -> None:
    rng = random.Random(f"test/{name}")
    tally = _tally()
    for _ in range(PER_MUTATOR):
        _, data = fuzz.mutate(rng, corpus, name)
        path = tmp_path / "m.sob"
        path.write_bytes(data)
        fuzz.try_open(path, corpus, name, tally)
    assert tally.accepted == []
    assert tally.foreign == []
    assert sum(tally.outcomes.values()) == PER_MUTATOR


def test_site_signed_hostile_payloads_reach_the_safetensors_parser(corpus, tmp_path: Path) -> None:
    """Correctly signed mutants get past every cryptographic check, so the payload parser itself refuses them."""
    rng = random.Random("signed-payload")
    tally = _tally()
    for _ in range(60):
        _, data = fuzz.mutate(rng, corpus, "signed_payload")
        (tmp_path / "m.sob").write_bytes(data)
        fuzz.try_open(tmp_path / "m.sob", corpus, "signed_payload", tally)
    assert dict(tally.outcomes) == {"TensorPayloadError": 60}


def test_seeded_mixed_mutants(corpus, tmp_path: Path) -> None:
    tally = fuzz.fuzz_bundles(corpus, tmp_path, 220, seed=20261126)
    assert tally.accepted == [] and tally.foreign == []
    assert {"BundleFormatError", "BundleAuthError", "TensorPayloadError"} <= set(tally.outcomes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), junk=st.binary(min_size=1, max_size=64), replace=st.booleans(), which=st.integers(0, 1))
def test_spliced_bytes_are_refused(corpus, tmp_path: Path, where: float, junk: bytes, replace: bool, which: int) -> None:
    original = corpus.bundles[which]
    at = int(where * len(original))
    data = original[:at] + junk + original[at + (len(junk) if replace else 0):]
    if data == original:
        return
    path = tmp_path / "h.sob"
    path.write_bytes(data)
    with pytest.raises(SecureOneshotError):
        open_bundle(path, corpus.server, corpus.trust, now=fuzz.NOW)


def test_parse_payload_fuzz_raises_only_payload_errors(corpus) -> None:
    tally = fuzz.fuzz_parse_payload(corpus, 400, seed=7)
    assert tally.foreign == []
    assert tally.outcomes["TensorPayloadError"] > 300


@pytest.mark.parametrize("seed", range(3))
def test_every_hostile_safetensors_case_is_refused(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        with pytest.raises(TensorPayloadError):
            parse_payload(bytearray(fuzz.hostile_safetensors(rng)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(alphabet="[]{}\":,0a\\ ", max_size=300).map(str.encode))
def test_parse_strict_json_raises_only_value_error(data: bytes) -> None:
    try:
        parse_strict_json(data, canonical=False, max_depth=4)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(header=st.binary(max_size=120), data=st.binary(max_size=32))
def test_parse_payload_with_arbitrary_header_bytes(header: bytes, data: bytes) -> None:
    payload = len(header).to_bytes(8, "little") + header + data
    try:
        parse_payload(bytearray(payload))
    except TensorPayloadError:
        pass

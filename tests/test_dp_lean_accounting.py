"""Opacus's accountants loaded without the opacus package give the very epsilons of ``opacus.accountants``.

The verifier (policy/dp.py) loads Opacus's accounting files under a private package name so that checking a
DP claim does not import PyTorch; these tests hold it to Opacus imported the normal way, bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from secure_oneshot.errors import PrivacyError
from secure_oneshot.policy import dp, opacus_accounting
from secure_oneshot.policy.dp import PRV_DELTA_ERROR_RATIO, PRV_EPS_ERROR, RDP_ORDERS, compute_epsilon

from .subprocess_helpers import json_from_fresh_python

HISTORIES = [
    ((1.1, 0.01, 1000),),
    ((0.8, 0.004, 25_000),),
    ((1.0, 0.01, 1000), (1.5, 0.02, 300), (4.0, 1.0, 1)),
    ((0.7, 0.02, 100), (2.0, 0.05, 300)),
]
DELTAS = [1e-5, 1e-3]


def _opacus_epsilon(accountant: str, history: tuple, delta: float) -> float:
    import numpy as np
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = list(history)
        return float(rdp.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
    prv = PRVAccountant()
    prv.history = list(history)
    with np.errstate(divide="ignore"):
        return float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR, delta_error=delta * PRV_DELTA_ERROR_RATIO))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("delta", DELTAS)
def test_lean_epsilon_equals_opacus_imported_normally(accountant: str, history: tuple, delta: float) -> None:
    assert compute_epsilon(accountant, history, delta) == _opacus_epsilon(accountant, history, delta)


def test_the_loaded_code_is_opacus_own_files() -> None:
    """Every accountant module but the stand-in base class is a file of the installed Opacus, unchanged."""
    import opacus.accountants as real

    directory = Path(real.__file__).resolve().parent
    classes = {name: opacus_accounting.accountant_class(name) for name in ("rdp", "prv")}
    for name, cls in classes.items():
        module = sys.modules[cls.__module__]
        assert Path(module.__file__).resolve() == directory / f"{name}.py"
        assert cls.__qualname__ == {"rdp": "RDPAccountant", "prv": "PRVAccountant"}[name]
    analysis = opacus_accounting.prv_analysis()
    assert Path(analysis.__file__).resolve() == directory / "analysis" / "prv" / "__init__.py"
    prefix = opacus_accounting.PACKAGE + "."
    loaded = {name: module for name, module in sys.modules.items() if name.startswith(prefix)}
    for name, module in loaded.items():
        if name == prefix + "accountant":  # the stand-in: no file, the history list only
            assert getattr(module, "__file__", None) is None
            continue
        relative = name[len(prefix):].replace(".", "/")
        expected = {directory / f"{relative}.py", directory / relative / "__init__.py"}
        assert Path(module.__file__).resolve() in expected, name


def test_checking_a_claim_imports_scipy_but_neither_torch_nor_opacus() -> None:
    """In a fresh interpreter: RDP and PRV recomputation load no torch and register nothing as ``opacus``."""
    code = (
        "import json, sys\n"
        "from secure_oneshot.policy.dp import compute_epsilon\n"
        "eps = [compute_epsilon(a, [(1.0, 0.01, 100)], 1e-5) for a in ('rdp', 'prv')]\n"
        "print(json.dumps({'eps': eps, 'top': sorted({m.split('.')[0] for m in sys.modules})}))\n"
    )
    report = json_from_fresh_python(code, timeout=120)
    assert all(0 < e < 10 for e in report["eps"])
    heavy = {"torch", "torchvision", "opacus", "diffusers", "sklearn", "pandas", "matplotlib"}
    assert heavy.isdisjoint(report["top"]), sorted(heavy & set(report["top"]))
    assert "scipy" in report["top"]  # Opacus's analysis needs it: the documented exception


def test_a_missing_opacus_is_a_privacy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No opacus installed: a PrivacyError with a hint, not an ImportError traceback."""
    monkeypatch.setattr(opacus_accounting.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PrivacyError, match="opacus is not installed"):
        opacus_accounting._opacus_root()


def test_scipy_signal_is_imported_only_when_a_heterogeneous_history_convolves() -> None:
    """A one-pair history never calls ``convolve``: its check must not pay for ``scipy.signal``; two pairs must get SciPy's own."""
    code = (
        "import json, sys\n"
        "from secure_oneshot.policy import opacus_accounting\n"
        "from secure_oneshot.policy.dp import compute_epsilon\n"
        "one = compute_epsilon('prv', [(1.1, 0.01, 1000)], 1e-5)\n"
        "before = 'scipy.signal' in sys.modules\n"
        "two = compute_epsilon('prv', [(1.0, 0.01, 1000), (1.5, 0.02, 300)], 1e-5)\n"
        "compose = sys.modules[opacus_accounting.PACKAGE + '.analysis.prv.compose']\n"
        "import scipy.signal\n"
        "print(json.dumps({'one': one, 'two': two, 'before': before, 'after': 'scipy.signal' in sys.modules,\n"
        "                  'forwards_to_scipy': compose.convolve._function is scipy.signal.convolve}))\n"
    )
    report = json_from_fresh_python(code, timeout=120)
    assert report["before"] is False
    assert report["after"] is True and report["forwards_to_scipy"] is True
    assert report["one"] == _opacus_epsilon("prv", ((1.1, 0.01, 1000),), 1e-5)
    assert report["two"] == _opacus_epsilon("prv", ((1.0, 0.01, 1000), (1.5, 0.02, 300)), 1e-5)


def test_the_deferral_touches_no_other_module() -> None:
    """Only the loaded Opacus files see the deferring ``__import__``; everyone else's imports are Python's own."""
    import builtins

    import numpy as np
    import scipy.signal

    opacus_accounting.prv_analysis()
    compose = sys.modules[opacus_accounting.PACKAGE + ".analysis.prv.compose"]
    assert builtins.__import__ is not opacus_accounting._deferring_import
    assert compose.__dict__["__builtins__"]["__import__"] is opacus_accounting._deferring_import
    assert sys.modules["scipy.signal"] is scipy.signal and callable(scipy.signal.convolve)
    left, right = np.random.default_rng(0).random(64), np.random.default_rng(1).random(64)
    assert np.array_equal(compose.convolve(left, right, mode="same"), scipy.signal.convolve(left, right, mode="same"))
    assert not any(isinstance(f, type(compose.convolve)) for f in vars(scipy.signal).values())


def test_prv_derives_its_domain_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cell cap and get_epsilon share one domain: Opacus's RDP-based domain search runs once per recomputation."""
    opacus_accounting.accountant_class("prv")
    real = opacus_accounting.prv_analysis().compute_safe_domain_size
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    holders = [m for name, m in list(sys.modules.items())   # every loaded module that imported the function by name
               if name.startswith(opacus_accounting.PACKAGE) and getattr(m, "compute_safe_domain_size", None) is real]
    assert len(holders) >= 2   # the analysis package and prv.py at least
    for module in holders:
        monkeypatch.setattr(module, "compute_safe_domain_size", counting)
    history = ((1.0, 0.01, 1000), (1.5, 0.02, 300))
    dp._epsilon_of.cache_clear()   # a history recomputed earlier in this process would be remembered, not recomputed
    assert compute_epsilon("prv", history, 1e-5) == _opacus_epsilon("prv", history, 1e-5)
    assert len(calls) == 1

"""Opacus's privacy accountants, loaded without the ``opacus`` package (and so without PyTorch).

Recomputing a DP claim (:mod:`.dp`) must use Opacus's own accounting code, the
authority a site's training used, but ``import opacus.accountants`` executes
``opacus/__init__.py`` (the privacy engine, hence PyTorch) and
``opacus/accountants/accountant.py``, whose base class imports
``opacus.optimizers.DPOptimizer`` for a training hook.  Neither is needed to turn
a history into an epsilon.

This module loads the installed Opacus's accounting source files, unchanged and
from their installed location, as the subpackages of a private package
(:data:`PACKAGE`) that stands for ``opacus/accountants``:

* ``rdp`` and ``prv``: the ``RDPAccountant`` and ``PRVAccountant`` classes;
* ``analysis.rdp`` and ``analysis.prv``: the RDP series and the PRV
  discretisation, domain and FFT composition they call.

The one file *not* loaded is ``accountant.py``: ``accountant`` is a stand-in
module whose ``IAccountant`` keeps the ``history`` list that the accountants'
maths read, and nothing else (no optimizer hook, no state dict).  Every line
that computes epsilon is Opacus's.  ``tests/test_dp_lean_accounting.py``
checks that epsilons equal, bit for bit, those of ``opacus.accountants``
imported normally.

What this still imports: NumPy and SciPy (``scipy.special`` for RDP; also
``scipy.integrate`` and ``scipy.fft`` for PRV), which Opacus's analysis itself
imports.  One import is deferred: ``analysis/prv/compose.py`` imports
``scipy.signal`` for ``convolve`` alone, which only a history of two or more
distinct (noise multiplier, sample rate) pairs calls, and importing
``scipy.signal`` costs more CPU than the rest of SciPy's PRV needs together
(it pulls in ``scipy.stats``, ``interpolate``, ``optimize``).  The loaded
modules see ``scipy.signal.convolve`` as a forwarder that imports the real
``scipy.signal`` on its first call and passes its arguments through unchanged
(:data:`DEFERRED_IMPORTS`), so the numerics are SciPy's own.  The deferral lives
in the loaded modules' own ``__builtins__`` (their ``__import__``); nothing is
registered under ``scipy`` or changed for any other module.

Nothing is registered under the ``opacus`` name, so a later ``import opacus``
(training) gets the real package.
"""

from __future__ import annotations

import abc
import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

from ..errors import PrivacyError

__all__ = ["PACKAGE", "DEFERRED_IMPORTS", "accountant_class", "prv_analysis"]

PACKAGE = "_secure_oneshot_opacus_accountants"
"""The private package name Opacus's ``accountants`` directory is loaded under."""

DEFERRED_IMPORTS: dict[str, frozenset[str]] = {"scipy.signal": frozenset({"convolve"})}
"""Module -> functions that Opacus's accounting files import by name but that are imported on first call."""

_LOCK = threading.Lock()
_INSTALL_HINT = "install the project's dependencies (pip install opacus) on the machine that checks DP claims"


class IAccountant(abc.ABC):
    """Stand-in for ``opacus.accountants.accountant.IAccountant``: the accountants' ``history`` and nothing else.

    Opacus's base class also offers an optimizer hook and a state dict, which import
    ``DPOptimizer`` (PyTorch); recomputing epsilon uses neither.
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []


class _DeferredFunction:
    """Stands for ``module.name``: imports ``module`` on the first call and calls the real function."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name
        self._function: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._function is None:
            self._function = getattr(importlib.import_module(self._module), self._name)
        return self._function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"


def _deferring_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
    """``__import__`` of the loaded accounting modules: ``from M import f`` of a deferred ``M.f`` imports nothing yet."""
    deferred = DEFERRED_IMPORTS.get(name) if level == 0 else None
    if deferred is not None and fromlist and set(fromlist) <= deferred:
        return types.SimpleNamespace(**{f: _DeferredFunction(name, f) for f in fromlist})
    return builtins.__import__(name, globals, locals, fromlist, level)


_BUILTINS = {**builtins.__dict__, "__import__": _deferring_import}


class _AccountingLoader(importlib.machinery.SourceFileLoader):
    """Opacus's source file, run with :data:`_BUILTINS` as its builtins (the deferring ``__import__``)."""

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__["__builtins__"] = _BUILTINS
        super().exec_module(module)


class _AccountingFinder(importlib.abc.MetaPathFinder):
    """Finds the private package's submodules in Opacus's directory, with :class:`_AccountingLoader`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PACKAGE + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = _AccountingLoader(spec.loader.name, spec.loader.path)
        return spec


def _opacus_root() -> Path:
    """The installed ``opacus`` package directory, found without executing ``opacus/__init__.py``."""
    try:
        spec = importlib.util.find_spec("opacus")
    except (ImportError, ValueError) as e:
        raise PrivacyError(f"cannot load Opacus's accountants: {e}", hint=_INSTALL_HINT) from e
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PrivacyError("cannot load Opacus's accountants: opacus is not installed", hint=_INSTALL_HINT)
    return Path(locations[0])


def _package() -> types.ModuleType:
    """Register the private package (once): Opacus's ``accountants`` directory with the stand-in base class."""
    with _LOCK:
        existing = sys.modules.get(PACKAGE)
        if existing is not None:
            return existing
        directory = _opacus_root() / "accountants"
        if not (directory / "rdp.py").is_file() or not (directory / "analysis" / "prv").is_dir():
            raise PrivacyError(f"cannot load Opacus's accountants: {directory} does not hold rdp.py and analysis/prv",
                               hint=_INSTALL_HINT)
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(directory)]
        package = importlib.util.module_from_spec(spec)
        base = types.ModuleType(f"{PACKAGE}.accountant", IAccountant.__doc__)
        base.IAccountant = IAccountant  # type: ignore[attr-defined]
        sys.modules[f"{PACKAGE}.accountant"] = base   # before any accountant module runs `from .accountant import`
        sys.modules[PACKAGE] = package
        if not any(isinstance(finder, _AccountingFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _AccountingFinder())   # answers for PACKAGE's submodules only
        return package


def _load(submodule: str) -> types.ModuleType:
    _package()
    try:
        return importlib.import_module(f"{PACKAGE}.{submodule}")
    except ImportError as e:
        raise PrivacyError(f"cannot load Opacus's accountants ({submodule}): {e}", hint=_INSTALL_HINT) from e


def accountant_class(name: str) -> Any:
    """Opacus's accountant class: ``"rdp"`` -> ``RDPAccountant``, ``"prv"`` -> ``PRVAccountant``.

    Raises:
        ValueError: another name (a caller bug).
        PrivacyError: Opacus is not installed or its files are not where Opacus 1.x keeps them.
    """
    classes = {"rdp": ("rdp", "RDPAccountant"), "prv": ("prv", "PRVAccountant")}
    if name not in classes:
        raise ValueError(f"no accountant {name!r}")
    module, attribute = classes[name]
    return getattr(_load(module), attribute)


def prv_analysis() -> types.ModuleType:
    """Opacus's ``accountants.analysis.prv`` module (PRV discretisation helpers)."""
    return _load("analysis.prv")

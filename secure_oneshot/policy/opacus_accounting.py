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
``scipy.integrate``, ``scipy.fft`` and ``scipy.signal`` for PRV), which Opacus's
analysis itself imports.  Nothing is registered under the ``opacus`` name, so a
later ``import opacus`` (training) gets the real package.
"""

from __future__ import annotations

import abc
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from pathlib import Path
from typing import Any

from ..errors import PrivacyError

__all__ = ["PACKAGE", "accountant_class", "prv_analysis"]

PACKAGE = "_secure_oneshot_opacus_accountants"
"""The private package name Opacus's ``accountants`` directory is loaded under."""

_LOCK = threading.Lock()
_INSTALL_HINT = "install the project's dependencies (pip install opacus) on the machine that checks DP claims"


class IAccountant(abc.ABC):
    """Stand-in for ``opacus.accountants.accountant.IAccountant``: the accountants' ``history`` and nothing else.

    Opacus's base class also offers an optimizer hook and a state dict, which import
    ``DPOptimizer`` (PyTorch); recomputing epsilon uses neither.
    """

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []


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

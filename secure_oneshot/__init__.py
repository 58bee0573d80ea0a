"""secure-oneshot: one-shot federated learning on medical images with signed, encrypted weight bundles.

The public API is re-exported from :mod:`secure_oneshot.keys` and
:mod:`secure_oneshot.bundle`; the CLI (:mod:`secure_oneshot.cli`) only calls it.
"""

__version__ = "0.1.0"

from .errors import SecureOneshotError  # noqa: E402

__all__ = ["__version__", "SecureOneshotError"]

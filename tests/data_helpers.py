"""A smaller copy of a real MedMNIST file, for tests of plumbing that would otherwise train on every record."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def thinned_root(data_root: Path, folder: Path, flag: str, every: int) -> Path:
    """A data root holding every ``every``-th record of each split of ``flag`` (the label mix stays about the same).

    What the studies and demos of these tests check (cells, resume, bundles, audits, reports, plots, protocol) does
    not depend on how many records a site has; fewer records make every site training, DP step, audit and
    distillation proportionally cheaper."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(data_root / f"{flag}.npz") as npz:
        arrays = {name: npz[name][::every] for name in npz.files}
    np.savez(folder / f"{flag}.npz", **arrays)
    return folder

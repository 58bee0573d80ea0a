"""Split a dataset's records among N sites: IID or Dirichlet over labels, seeded, with a minimum size.

Pure functions of (labels, config): the same seed gives the same split on any
machine.  Every index lands in exactly one site, or, with ``public_fraction``,
in the public set that no site holds (a simulation of public images the server
has; :func:`public_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["Partition", "iid_partition", "dirichlet_partition", "partition_indices", "public_indices", "label_counts"]


@dataclass(frozen=True)
class Partition:
    """How to split: ``scheme`` "iid" or "dirichlet" (alpha 0.6 in the authors' code; 0.1-1.0 is the usual grid)."""

    n_sites: int = 5
    scheme: str = "iid"
    alpha: float = 0.6
    seed: int = 0
    min_size: int = 10
    max_tries: int = 100
    public_fraction: float = 0.0   # this fraction of the records goes to no site (public_indices)

    def __post_init__(self) -> None:
        if not (isinstance(self.public_fraction, (int, float)) and 0 <= self.public_fraction < 1):
            raise ConfigError(f"public_fraction must be in [0, 1), got {self.public_fraction!r}")


def iid_partition(n: int, n_sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into nearly equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), n_sites)]


def dirichlet_partition(labels: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """For each class, proportions ~ Dir(alpha) decide how its records are dealt to the sites."""
    sites: list[list[int]] = [[] for _ in range(n_sites)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, part in enumerate(np.split(members, cuts)):
            sites[site].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in sites]


def label_counts(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> list[list[int]]:
    return [np.bincount(labels[p], minlength=n_classes).tolist() for p in parts]


def public_indices(n: int, config: Partition) -> np.ndarray:
    """The records no site holds: ``round(public_fraction * n)`` of them, drawn uniformly with their own seeded
    generator (so the sites' draw below does not depend on whether a public set is taken)."""
    if config.public_fraction == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([config.seed, 0x9B5C])   # a stream of its own, fixed by the seed
    return np.sort(rng.permutation(n)[:int(round(config.public_fraction * n))]).astype(np.int64)


def partition_indices(labels: np.ndarray, config: Partition) -> list[np.ndarray]:
    """Indices per site (into ``labels``), none of them public.  Dirichlet draws are repeated (seeded) until every
    site has ``min_size`` records.

    Raises:
        ConfigError: impossible settings, or no draw met the minimum size in ``max_tries`` attempts.
    """
    public = public_indices(len(labels), config)
    if len(public):
        private = np.setdiff1d(np.arange(len(labels)), public)
        return [private[p] for p in _site_indices(labels[private], config)]
    return _site_indices(labels, config)


def _site_indices(labels: np.ndarray, config: Partition) -> list[np.ndarray]:
    n = len(labels)
    if config.n_sites < 1 or config.n_sites * config.min_size > n:
        raise ConfigError(f"cannot give {config.n_sites} sites at least {config.min_size} of {n} records each")
    rng = np.random.default_rng(config.seed)
    if config.scheme == "iid":
        return iid_partition(n, config.n_sites, rng)
    if config.scheme != "dirichlet" or config.alpha <= 0:
        raise ConfigError(f"partition scheme must be 'iid' or 'dirichlet' with alpha > 0, got {config.scheme!r} alpha={config.alpha}")
    for _ in range(config.max_tries):
        parts = dirichlet_partition(labels, config.n_sites, config.alpha, rng)
        if min(len(p) for p in parts) >= config.min_size:
            return parts
    raise ConfigError(
        f"no Dirichlet(alpha={config.alpha}) split gave every one of {config.n_sites} sites {config.min_size} records in {config.max_tries} tries",
        hint="raise alpha, lower min_size, or use fewer sites",
    )

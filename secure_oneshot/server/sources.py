"""Where the distillation images come from: one interface over the synthesis methods.

Each epoch, :meth:`SnapshotSource.epoch` returns the batches the student takes
one SGD step on, in order, each with a per-image weight ``a`` of the
curriculum (``a`` on the teacher, ``1 - a`` on the noise-adapted teacher; see
:mod:`secure_oneshot.server.distill`):

* ``inversion`` (FedISCA, the default): every kept snapshot of one model
  inversion run, noise -> realistic, ``a = i / n`` for snapshot ``i`` of ``n``;
* ``generator``: a class-balanced batch sampled from the sites' released
  diffusion generators (deterministic DDIM, ``generator_steps`` steps), each
  generator drawing an equal share of every class; the same batch is shown
  ``n`` times, randomly rolled like inversion's jitter, with ``a = 1``
  (generator samples are meant to be realistic, so only the teacher labels
  them);
* ``mixed``: each step's batch is an inversion snapshot (``(1 - share) * B``
  images, its own ``a``) concatenated with the generator batch (``share * B``
  images, ``a = 1``);
* ``proxy``: each step a fresh random batch of ``B`` public, unlabelled images
  held by the server (:mod:`secure_oneshot.data.proxy_images`), jittered, with
  ``a = 1``; no inversion;
* ``inversion+proxy``: each step's batch is an inversion snapshot
  (``(1 - proxy_share) * B`` images) concatenated with ``proxy_share * B``
  fresh proxy images (``a = 1``).

``n = steps // snapshot_every`` for every method, so they give the student the
same number of steps per epoch and compare fairly.

The batches are kept in a :class:`~secure_oneshot.server.snapshot_store.SnapshotStore`:
on the device while the epoch's images fit ``snapshot_memory_mib``, else in a
private temporary file, read back one batch at a time (bit for bit the same
tensors); the caller closes it (``with source.epoch(e) as batches``).

What this module does not do: train the student or load bundles.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .ensemble import Ensemble
from .execution import Execution
from .snapshot_store import DEFAULT_SNAPSHOT_MEMORY_MIB, SnapshotStore
from .synthesis import InversionConfig, balanced_labels, jitter, synthesize_batch

__all__ = ["METHODS", "PROXY_METHODS", "SynthesisMethod", "SiteGenerator", "Snapshot", "SnapshotSource"]

METHODS = ("inversion", "generator", "mixed", "proxy", "inversion+proxy")
PROXY_METHODS = ("proxy", "inversion+proxy")

Snapshot = tuple[Tensor, Tensor]
"""``(images (N, C, H, W), a (N,))`` on the device."""


@dataclass(frozen=True)
class SynthesisMethod:
    """Which images the student learns from (module docstring).

    Raises:
        ConfigError: unknown method, a share outside (0, 1) for ``mixed``, or steps < 1.
    """

    method: str = "inversion"
    generator_share: float = 0.5     # mixed: the fraction of each batch drawn from the generators
    generator_steps: int = 25        # DDIM steps per sample
    proxy_share: float = 0.5         # inversion+proxy: the fraction of each batch drawn from the proxy images

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("generator_share", "proxy_share"):
            share = getattr(self, name)
            if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share < 1:
                problems.append(f"{name} must be in (0, 1), got {share!r}")
        if not isinstance(self.generator_steps, int) or self.generator_steps < 1:
            problems.append(f"generator_steps must be an integer >= 1, got {self.generator_steps!r}")
        if problems:
            raise ConfigError("invalid synthesis method: " + "; ".join(problems))

    def generator_count(self, batch_size: int) -> int:
        """How many of an epoch's ``batch_size`` images come from the generators."""
        if self.method == "generator":
            return batch_size
        if self.method == "mixed":
            return _share(self.generator_share, batch_size)
        return 0

    def proxy_count(self, batch_size: int) -> int:
        """How many of each step's ``batch_size`` images are proxy images."""
        if self.method == "proxy":
            return batch_size
        if self.method == "inversion+proxy":
            return _share(self.proxy_share, batch_size)
        return 0


def _share(share: float, batch_size: int) -> int:
    """``round(share * batch)``, leaving at least one image to each part."""
    return min(batch_size - 1, max(1, round(share * batch_size)))


@dataclass
class SiteGenerator:
    """A site's released generator: the UNet and the DDPM schedule it was trained with."""

    model: nn.Module
    scheduler: dict[str, Any]
    config: Any = None          # its GeneratorConfig (padding, sizes), when known


def generator_labels(count: int, num_classes: int, num_generators: int) -> tuple[Tensor, Tensor]:
    """Balanced labels and which generator draws each image: consecutive blocks of one of every class go round-robin,
    so every generator draws every class equally often (up to one block)."""
    labels = balanced_labels(count, num_classes)
    owner = (torch.arange(count) // num_classes) % num_generators
    return labels, owner


class SnapshotSource:
    """An epoch's training batches for the student, by :class:`SynthesisMethod`.

    Raises:
        ConfigError: a method that needs generators when no site released one.
    """

    def __init__(self, site_models: Sequence[nn.Module], teacher: Ensemble, inversion: InversionConfig, method: SynthesisMethod,
                 execution: Execution, generators: Sequence[SiteGenerator] = (), proxy_images: Tensor | None = None,
                 snapshot_memory_mib: float = DEFAULT_SNAPSHOT_MEMORY_MIB, **inversion_options: Any) -> None:
        if not isinstance(snapshot_memory_mib, (int, float)) or isinstance(snapshot_memory_mib, bool) \
                or not 0 <= snapshot_memory_mib < float("inf"):
            raise ConfigError(f"snapshot_memory_mib must be a number >= 0, got {snapshot_memory_mib!r}",
                              hint="the MiB of an epoch's snapshots kept in memory before they go to a temporary file")
        self.snapshot_memory_bytes = int(snapshot_memory_mib * 2**20)
        self.site_models, self.teacher, self.inversion = site_models, teacher, inversion
        self.method, self.execution, self.generators = method, execution, list(generators)
        self.inversion_options = inversion_options
        self.n_generated = method.generator_count(inversion.batch_size)
        self.n_proxy = method.proxy_count(inversion.batch_size)
        if self.n_generated and not self.generators:
            raise ConfigError(f"synthesis method {method.method!r} needs site generators, but no site released one",
                              hint="use --synthesis inversion, or have sites export their generator artifact")
        if self.n_proxy and (proxy_images is None or len(proxy_images) == 0):
            raise ConfigError(f"synthesis method {method.method!r} needs proxy images, but none were given",
                              hint="pass --proxy-images FLAG:SPLIT or a folder of public images")
        expected = (inversion.channels, inversion.image_size, inversion.image_size)
        if self.n_proxy and tuple(proxy_images.shape[1:]) != expected:  # type: ignore[union-attr]
            raise ConfigError(f"proxy images are {tuple(proxy_images.shape[1:])}, the sites take {expected}",  # type: ignore[union-attr]
                              hint="load them at the sites' image size and channel count")
        self.proxy_images = proxy_images if self.n_proxy else None

    @property
    def steps_per_epoch(self) -> int:
        return self.inversion.steps // self.inversion.snapshot_every

    def store(self) -> SnapshotStore:
        """An empty store for one epoch's batches, with this source's memory budget."""
        return SnapshotStore(self.execution.torch_device, self.snapshot_memory_bytes)

    def epoch(self, epoch: int) -> SnapshotStore:
        """The student's batches for ``epoch`` (0-based), reproducible from the seeds; the caller closes the store."""
        extra = self.n_generated + self.n_proxy
        inverted = self._inverted(epoch) if extra < self.inversion.batch_size else None
        if not extra:
            assert inverted is not None
            return inverted
        batches = self.store()
        try:
            if self.n_proxy:
                self._with_proxy(epoch, inverted, batches)
            else:
                self._with_generated(epoch, inverted, batches)
        except BaseException:
            batches.close()
            raise
        finally:
            if inverted is not None:
                inverted.close()
        return batches

    def _with_generated(self, epoch: int, inverted: SnapshotStore | None, batches: SnapshotStore) -> None:
        device = self.execution.torch_device
        generated = self._generated(epoch).to(device)
        shifts = torch.Generator().manual_seed(self.inversion.seed + epoch)
        ones = torch.ones(len(generated), device=device)
        for i in range(self.steps_per_epoch):
            rolled = jitter(generated, self.inversion.jitter, shifts)
            if inverted:
                x, a = inverted[i]
                batches.append(torch.cat([x, rolled]), torch.cat([a, ones]))
            else:
                batches.append(rolled, ones, teacher_only=True)

    def _with_proxy(self, epoch: int, inverted: SnapshotStore | None, batches: SnapshotStore) -> None:
        """Each step: a fresh draw of proxy images (without replacement within the draw), jittered, ``a = 1``,
        after the step's inversion snapshot if there is one."""
        assert self.proxy_images is not None
        device = self.execution.torch_device
        draws = torch.Generator().manual_seed(_sample_seed(self.inversion.seed, epoch, -1))
        ones = torch.ones(self.n_proxy, device=device)
        for i in range(self.steps_per_epoch):
            pick = torch.randperm(len(self.proxy_images), generator=draws)[:self.n_proxy]
            drawn = self.proxy_images[pick]
            if len(drawn) < self.n_proxy:  # a proxy set smaller than the batch: draw it again
                drawn = self.proxy_images[torch.randint(len(self.proxy_images), (self.n_proxy,), generator=draws)]
            x = self.execution.layout(jitter(drawn, self.inversion.jitter, draws).to(device))
            if inverted:
                snapshot, a = inverted[i]
                batches.append(torch.cat([snapshot, x]), torch.cat([a, ones]))
            else:
                batches.append(x, ones, teacher_only=True)

    def _inverted(self, epoch: int) -> SnapshotStore:
        """Every kept snapshot of one inversion run, ``a = i / n`` for snapshot ``i`` of ``n = steps // snapshot_every``."""
        cfg = dataclasses.replace(self.inversion, seed=self.inversion.seed + epoch,  # a fresh batch every epoch
                                  batch_size=self.inversion.batch_size - self.n_generated - self.n_proxy)
        n = cfg.steps // cfg.snapshot_every   # synthesize_batch hands over a copy at every snapshot_every-th step
        store = self.store()

        def keep(step: int, x: Tensor) -> None:
            store.append(self.execution.layout(x), torch.full((len(x),), len(store) / n, device=x.device))

        try:
            synthesize_batch(self.site_models, self.teacher, cfg, execution=self.execution, on_snapshot=keep,
                             **self.inversion_options)
        except BaseException:
            store.close()
            raise
        return store

    @torch.no_grad()
    def _generated(self, epoch: int) -> Tensor:
        from ..client.generator import sample_images

        labels, owner = generator_labels(self.n_generated, self.inversion.num_classes, len(self.generators))
        images = torch.empty(self.n_generated, self.inversion.channels, self.inversion.image_size, self.inversion.image_size)
        for g, site in enumerate(self.generators):
            mine = (owner == g).nonzero().squeeze(1)
            if len(mine):
                images[mine] = sample_images(site.model, site.scheduler, labels[mine], steps=self.method.generator_steps,
                                             seed=_sample_seed(self.inversion.seed, epoch, g), device=self.execution.torch_device)
        return images


def _sample_seed(seed: int, epoch: int, generator: int) -> int:
    """A distinct, reproducible noise seed per (run seed, epoch, generator)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{generator}".encode()).digest()[:8], "big")

"""The teacher: the mean of the site classifiers' logits (or a per-class weighted pooling), run as one batched computation.

When every site shares one architecture (the usual case: five ResNet-18s), the
sites' parameters and buffers are stacked (``torch.func.stack_module_state``)
and a single skeleton module is run over them with ``functional_call`` +
``vmap``: one batched computation per step, no Python loop over sites.
Sites of different architectures (each site chooses its own) are split into
groups of identical architecture (:func:`same_architecture`): a group of two
or more sites runs batched, a site alone runs as itself, and the per-site
outputs come back in site order whatever the grouping.

The ensemble owns frozen copies of the site models (``requires_grad=False``,
eval mode), so building one never changes the caller's models and synthesis
never accumulates gradients in the teachers.  With ``adapt_bn=True`` the
BatchNorm layers run in train mode instead: they normalise with each batch's
own statistics and update their (stacked) running statistics, which is
FedISCA's noise-adapted teacher.

:meth:`Ensemble.per_site` also takes a *probe*: a function called inside each
site's computation (inside ``vmap`` on the batched path) right after that
site's forward pass, returning one scalar per site.  The synthesis code uses it
to turn what forward hooks recorded during the pass into a per-site
BatchNorm-statistics loss; see :mod:`secure_oneshot.server.synthesis`.

Per-site, per-class weights (``weights[s, c] >= 0``, normalised over sites
for each class) turn the teacher into ``sum_s w[s, c] * log_softmax(z_s)[c]``:
site ``s``'s evidence for class ``c`` counts with weight ``w[s, c]``.  Log-
probabilities, not raw logits, because a site's logits carry an arbitrary
per-image offset: weighted per class, that offset would become a bias towards
the classes the site is weighted on (a one-class site with logits (10, -10)
would still add 10 w[s, 0] to class 0 with w[s, 1] = 0).  A log-probability of
the class a site is sure about is about 0, so a site with zero weight on every
class it is wrong about adds almost nothing.  Equal weights give the softmax
of the plain mean of logits (they differ by a per-image constant); with
``weights=None`` the plain mean itself runs, bit for bit as before.

The weights live in :meth:`Ensemble.per_site`: each site's entry is scaled by
``S * w[s, c]`` so that the *mean over sites* is the weighted teacher wherever
it is computed (``forward``, and the synthesis code, which averages
``per_site`` itself).  :func:`~secure_oneshot.server.distill.distill` passes
the same weights to the teacher and the noise-adapted teacher it builds, and
synthesis uses that teacher.

Multi-label sites (``multi_label=True``: one sigmoid output per label) are
pooled by averaging their per-label probabilities, and the teacher returns the
logit of that average (:meth:`Ensemble.pool`), so its consumers keep working
on logits; per-class weights do not apply to them.

What this module does not do: load weights, check trust, choose the weights, or
train anything.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["Ensemble", "Probe", "architecture_groups", "batching_for", "same_architecture", "normalise_weights"]

Probe = Callable[[Any], Tensor]
"""Called after one site's forward pass with that site's probe input; returns a scalar tensor."""


def _signature(model: nn.Module) -> tuple[Any, ...]:
    modules = tuple((name, type(m)) for name, m in model.named_modules())
    params = tuple((name, p.shape, p.dtype) for name, p in model.named_parameters())
    buffers = tuple((name, b.shape, b.dtype) for name, b in model.named_buffers())
    return modules, params, buffers


def same_architecture(models: Sequence[nn.Module]) -> bool:
    """True when every model has the same module tree, parameter and buffer names, shapes and dtypes.

    That is what stacking needs; models whose ``forward`` depends on plain
    attributes that differ between them (not tensors) would still compare equal,
    so pass ``batched=False`` for such exotic models.
    """
    first = _signature(models[0])
    return all(_signature(m) == first for m in models[1:])


def batching_for(requested: bool | None, models: Sequence[nn.Module]) -> bool | None:
    """The ``batched`` argument for these models: a request to batch (``True``) batches each group of identical
    architecture when the sites differ (``None``), since one stacked computation needs one architecture."""
    return None if requested and not same_architecture(models) else requested


def architecture_groups(models: Sequence[nn.Module]) -> list[tuple[int, ...]]:
    """Site indices grouped by identical architecture (:func:`same_architecture`), in order of each group's first site."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, model in enumerate(models):
        groups.setdefault(_signature(model), []).append(index)
    return [tuple(g) for g in groups.values()]


def normalise_weights(weights: Tensor, num_sites: int) -> Tensor:
    """``(S, K)`` non-negative weights -> the same normalised over sites for each class (float32).

    Negative entries count as 0; a class whose weights are all 0 gets equal weights.

    Raises:
        ValueError: wrong shape, or a non-finite entry.
    """
    if weights.dim() != 2 or weights.shape[0] != num_sites:
        raise ValueError(f"teacher weights must have shape (sites={num_sites}, classes), got {tuple(weights.shape)}")
    w = weights.detach().float().cpu()
    if not torch.isfinite(w).all():
        raise ValueError("teacher weights must be finite")
    w = w.clamp(min=0)
    totals = w.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, w / totals.clamp(min=torch.finfo(torch.float32).tiny), torch.full_like(w, 1.0 / num_sites))


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _set_modes(module: nn.Module, adapt_bn: bool) -> None:
    """Eval everywhere; BatchNorm layers in train mode when ``adapt_bn``."""
    for m in module.modules():
        m.training = adapt_bn and _is_bn(m)


def _stack_probe_inputs(inputs: Sequence[Any]) -> Any:
    """Per-site pytrees (nested dicts of tensors) -> one pytree of stacked tensors (leading site dim)."""
    first = inputs[0]
    if isinstance(first, Mapping):
        if any(not isinstance(i, Mapping) or set(i) != set(first) for i in inputs):
            raise ValueError("probe inputs must have the same keys for every site on the batched path "
                             "(build the Ensemble with batched=False for per-site differences)")
        return {key: _stack_probe_inputs([i[key] for i in inputs]) for key in first}
    return torch.stack(list(inputs))


class Ensemble(nn.Module):
    """Mean of the site models' logits, or their per-class weighted log-probabilities (eval mode; BatchNorm in train mode with ``adapt_bn``).

    Args:
        models: the site classifiers (copied and frozen; the originals are untouched).
        batched: ``True`` stacks the sites (one architecture) and runs them with ``vmap``; ``False`` loops;
            ``None`` (default) stacks each group of two or more sites of identical architecture
            (:func:`architecture_groups`) and runs the others as themselves.
        adapt_bn: run BatchNorm layers in train mode (FedISCA's noise-adapted teacher).
        weights: ``(S, K)`` per-site, per-class weights (normalised here; see the module docstring), or
            ``None``: the plain mean of logits (the method as published).
        multi_label: the sites output one logit per label: pool per-label probabilities (:meth:`pool`).

    Raises:
        ValueError: no models, ``batched=True`` with differing architectures, or weights of the wrong shape.

    >>> teacher = Ensemble([site_a, site_b]).to("cuda")   # doctest: +SKIP
    >>> teacher(images).shape                              # doctest: +SKIP
    torch.Size([256, 2])
    """

    def __init__(self, models: Sequence[nn.Module], *, batched: bool | None = None, adapt_bn: bool = False,
                 weights: Tensor | None = None, multi_label: bool = False) -> None:
        super().__init__()
        if len(models) == 0:
            raise ValueError("an ensemble needs at least one site model")
        if multi_label and weights is not None:
            raise ValueError("per-class teacher weights do not apply to multi-label sites (their probabilities are averaged)")
        self.multi_label = multi_label
        # S * w[s, c]: the factor per_site applies so that the mean over sites is the weighted pooling.
        scale = None if weights is None else normalise_weights(weights, len(models)) * len(models)
        self.register_buffer("_site_scale", scale)
        copies = [_frozen_copy(m) for m in models]
        homogeneous = same_architecture(copies)
        if batched and not homogeneous:
            raise ValueError("batched=True needs site models of one architecture (same parameter names and shapes)")
        self.num_sites = len(copies)
        self.adapt_bn = adapt_bn
        # Runs: groups of identical architecture (batched=None: those of two or more sites stacked; batched=True:
        # the one group stacked), or one site each (batched=False).
        self._groups = architecture_groups(copies) if batched is None or batched else [(i,) for i in range(len(copies))]
        self._param_names: dict[int, list[str]] = {}
        self._buffer_names: dict[int, list[str]] = {}
        self.__dict__["_skeletons"] = {}
        for g, sites in enumerate(self._groups):
            if len(sites) > 1 or batched:
                self._init_stacked(g, [copies[s] for s in sites])
        single = [g[0] for i, g in enumerate(self._groups) if i not in self.__dict__["_skeletons"]]
        self.batched = len(self._groups) == 1 and 0 in self.__dict__["_skeletons"]   # one batched computation for all
        self.sites = nn.ModuleList([copies[s] for s in single])   # every site when looped, the lone ones otherwise
        self._single_index = {s: i for i, s in enumerate(single)}
        self.set_adapt_bn(adapt_bn)

    def _init_stacked(self, group: int, copies: list[nn.Module]) -> None:
        params, buffers = stack_module_state(copies)  # name -> (S_group, *shape)
        self._param_names[group], self._buffer_names[group] = list(params), list(buffers)
        for i, tensor in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"_stacked{group}_{i}", tensor.detach())  # buffers: moved by .to(), never trained
        # The skeleton holds no data (meta tensors) and stays outside the module tree so .to() skips it.
        self.__dict__["_skeletons"][group] = copies[0].to("meta")

    def to(self, *args: Any, **kwargs: Any) -> Ensemble:
        """As ``nn.Module.to``, except that a memory format applies to the site models run as themselves only.

        Stacked weights are 5-D (a leading site dimension) and have no channels_last form.
        """
        memory_format = kwargs.pop("memory_format", None)
        if args or kwargs:
            super().to(*args, **kwargs)
        if memory_format is not None:
            if self.__dict__["_skeletons"]:
                self.sites.to(memory_format=memory_format)
            else:
                super().to(memory_format=memory_format)
        return self

    # --- modes and hooks ---------------------------------------------------------------------

    def set_adapt_bn(self, adapt_bn: bool) -> Ensemble:
        """Switch BatchNorm layers between eval (the teacher) and train mode (noise-adapted)."""
        self.adapt_bn = adapt_bn
        for module in self.hook_modules():
            _set_modes(module, adapt_bn)
        return self

    def train(self, mode: bool = True) -> Ensemble:
        """Modes are fixed by ``adapt_bn``: ``train()``/``eval()`` on a parent module leave them alone."""
        self.training = False
        return self.set_adapt_bn(self.adapt_bn) if hasattr(self, "adapt_bn") else self

    def hook_groups(self) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """The modules that actually run, each with the sites it runs for (in site-group order).

        A group's skeleton (batched: forward hooks on it fire once per site, inside ``vmap``, where its
        parameters and buffers read as that site's), or a site model run as itself.
        """
        skeletons = self.__dict__["_skeletons"]
        return [(skeletons[g] if g in skeletons else self.sites[self._single_index[sites[0]]], sites)
                for g, sites in enumerate(self._groups)]

    def hook_modules(self) -> list[nn.Module]:
        """The modules of :meth:`hook_groups`: the skeleton (all batched) or each site model (loop), or a mix."""
        return [module for module, _ in self.hook_groups()]

    def _stacked_state(self, group: int | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """A batched group's stacked parameters and buffers (the first batched group by default)."""
        group = min(self.__dict__["_skeletons"]) if group is None else group
        names = self._param_names[group] + self._buffer_names[group]
        tensors = [getattr(self, f"_stacked{group}_{i}") for i in range(len(names))]
        n = len(self._param_names[group])
        return dict(zip(self._param_names[group], tensors[:n])), dict(zip(self._buffer_names[group], tensors[n:]))

    # --- forward -----------------------------------------------------------------------------

    @property
    def weights(self) -> Tensor | None:
        """The normalised ``(S, K)`` weights, or ``None`` for the plain mean of logits."""
        return None if self._site_scale is None else self._site_scale / self.num_sites

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, classes)``: the mean of the sites' logits (weighted: of their scaled log-probabilities;
        multi-label: the logit of the mean of their per-label probabilities)."""
        return self.pool(self.per_site_logits(x))

    def pool(self, per_site: Tensor) -> Tensor:
        """``(S, N, K)`` entries of :meth:`per_site` -> the teacher's ``(N, K)`` logits."""
        if not self.multi_label:
            return per_site.mean(dim=0)
        probabilities = torch.sigmoid(per_site.float()).mean(dim=0)
        return torch.logit(probabilities, eps=1e-6)   # finite where every site is certain

    def per_site_logits(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(S, N, classes)``: each site's entry of the teacher (see :meth:`per_site`)."""
        return self.per_site(x)[0]

    def _weighted(self, logits: Tensor) -> Tensor:
        """``(S, N, K)`` logits -> the sites' entries whose mean is the teacher (float32 when weighted)."""
        if self._site_scale is None:
            return logits
        if logits.shape[-1] != self._site_scale.shape[1]:
            raise ValueError(f"teacher weights cover {self._site_scale.shape[1]} classes, the sites output {logits.shape[-1]}")
        return torch.log_softmax(logits.float(), dim=-1) * self._site_scale[:, None, :]

    def per_site(self, x: Tensor, probe: Probe | None = None,
                 probe_inputs: Sequence[Any] | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-site logits ``(S, N, classes)`` and, with a probe, its per-site scalars ``(S,)``.

        With weights, site ``s``'s entry is ``S * w[s, c] * log_softmax(logits_s)[c]`` (float32), so that the
        mean over sites is always the teacher.

        Args:
            x: the input batch, shared by every site.
            probe: called right after each site's forward pass with that site's entry of
                ``probe_inputs`` (or ``{}``); must return a scalar tensor.
            probe_inputs: one pytree (nested dicts of tensors) per site; on the batched path they
                must have the same structure for every site (they are stacked and vmapped).
        """
        if probe_inputs is not None and len(probe_inputs) != self.num_sites:
            raise ValueError(f"{len(probe_inputs)} probe inputs for {self.num_sites} sites")
        if self.batched:   # one group, in site order already
            logits_all, scalars_all = self._batched(0, x, probe, probe_inputs)
            return self._weighted(logits_all), scalars_all
        logits: list[Tensor | None] = [None] * self.num_sites
        scalars: list[Tensor | None] = [None] * self.num_sites
        for g, sites in enumerate(self._groups):
            inputs = [probe_inputs[s] for s in sites] if probe_inputs else None
            if g in self._skeletons:
                group_logits, group_scalars = self._batched(g, x, probe, inputs)
            else:
                group_logits, group_scalars = self._single(sites[0], x, probe, inputs)
            for i, s in enumerate(sites):
                logits[s] = group_logits[i]
                scalars[s] = group_scalars[i] if group_scalars is not None else None
        stacked = torch.stack(logits)  # type: ignore[arg-type]  # (S, N, K) in site order
        return self._weighted(stacked), (torch.stack(scalars) if probe is not None else None)  # type: ignore[arg-type]

    def _batched(self, group: int, x: Tensor, probe: Probe | None,
                 probe_inputs: Sequence[Any] | None) -> tuple[Tensor, Tensor | None]:
        skeleton = self.__dict__["_skeletons"][group]
        params, buffers = self._stacked_state(group)
        extra = _stack_probe_inputs(probe_inputs) if probe_inputs else {}

        def one_site(p: dict[str, Tensor], b: dict[str, Tensor], e: Any, inputs: Tensor) -> tuple[Tensor, Tensor]:
            logits = functional_call(skeleton, (p, b), (inputs,))  # (N, classes) for this site
            return logits, (probe(e) if probe is not None else logits.new_zeros(()))

        logits, scalars = vmap(one_site, in_dims=(0, 0, 0, None))(params, buffers, extra, x)  # (S_group, N, K), (S_group,)
        return logits, (scalars if probe is not None else None)

    def _single(self, site: int, x: Tensor, probe: Probe | None,
                probe_inputs: Sequence[Any] | None) -> tuple[Tensor, Tensor | None]:
        logits = self.sites[self._single_index[site]](x)
        if probe is None:
            return logits[None], None
        return logits[None], probe(probe_inputs[0] if probe_inputs else {})[None]

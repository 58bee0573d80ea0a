"""Builders for policy, export and ingest tests: the test-vector identities, model directories, DP records."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from secure_oneshot.keys import Identity, TrustEntry, TrustStore, load_identity
from secure_oneshot.policy.dp import DpRecord, compute_epsilon

VECTOR_KEYS = Path(__file__).parent / "vectors" / "keys"
POLICIES = Path(__file__).resolve().parents[1] / "policies"


def example_policy(name: str, expires: datetime | None = None) -> str:
    """The text of ``policies/NAME`` with its expiry replaced: ``expires``, or 180 days from the real clock.

    The example policies expire (they are due for review every six months); a test whose command
    checks validity by the real clock must not start failing on that day.
    """
    moment = expires or datetime.now(timezone.utc) + timedelta(days=180)
    text, count = re.subn(r"(?m)^expires = \S+", f"expires = {moment:%Y-%m-%dT%H:%M:%SZ}", (POLICIES / name).read_text())
    assert count == 1, f"{name} has no single expires line"
    return text


@dataclass
class Cast:
    """The identities named in policies/*.toml (public test keys)."""

    site: Identity
    server: Identity
    escrow: Identity
    outsider: Identity
    dpo: Identity
    ciso: Identity

    def site_trust(self) -> TrustStore:
        store = TrustStore()
        for who in (self.server, self.escrow):
            store = store.with_entry(TrustEntry(who.public, frozenset({"recipient", "approver"} if who is self.escrow else {"recipient"})))
        for who in (self.dpo, self.ciso):
            store = store.with_entry(TrustEntry(who.public, frozenset({"approver"})))
        return store

    def server_trust(self) -> TrustStore:
        return TrustStore().with_entry(TrustEntry(self.site.public, frozenset({"sender"})))


def load_cast() -> Cast:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test keys are unprotected on purpose
        get = lambda name: load_identity(VECTOR_KEYS / f"{name}.key", None)  # noqa: E731
        return Cast(get("site-a"), get("server"), get("escrow"), get("outsider"), get("dpo"), get("ciso"))


def dp_record(*, noise: float = 1.1, rate: float = 0.01, steps: int = 1000, delta: float = 1e-5, accountant: str = "rdp",
              sampling: str = "poisson", claim: float | None = None, fingerprint: str = "sha256:site-a-train") -> DpRecord:
    """An honest DP record (epsilon recomputed with Opacus) unless ``claim`` overrides the claimed epsilon."""
    history = ((noise, rate, steps),)
    epsilon = compute_epsilon(accountant, history, delta) if claim is None else claim
    return DpRecord(accountant=accountant, history=history, delta=delta, epsilon=epsilon, max_grad_norm=1.0,
                    sampling=sampling, dataset_fingerprint=fingerprint, versions={"opacus": "test"})


def classifier_tensors(bn: bool = True, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g),
        "fc.weight": torch.randn(2, 4, generator=g),
        "fc.bias": torch.zeros(2),
    }
    if bn:  # BatchNorm: affine parameters are weights; running statistics are patient-derived
        tensors.update({"bn.weight": torch.ones(4), "bn.bias": torch.zeros(4), "bn.running_mean": torch.randn(4, generator=g),
                        "bn.running_var": torch.rand(4, generator=g) + 0.5, "bn.num_batches_tracked": torch.tensor(100)})
    else:  # GroupNorm after Opacus's fix
        tensors.update({"gn.weight": torch.ones(4), "gn.bias": torch.zeros(4)})
    tensors.update(extra or {})
    return tensors


def make_model_dir(root: Path, *, bn: bool = True, generator: bool = False, feature_stats: bool = False,
                   dp: dict[str, DpRecord] | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A model directory as `secure-oneshot train` will write it."""
    root.mkdir(parents=True, exist_ok=True)
    save_file(classifier_tensors(bn, extra), root / "classifier.safetensors")
    artifacts = {"classifier": {"architecture": "small-cnn", "in_channels": 1, "num_classes": 2}}
    if generator:
        save_file({"unet.conv_in.weight": torch.randn(8, 1, 3, 3), "unet.norm.weight": torch.ones(8)}, root / "generator.safetensors")
        artifacts["generator"] = {"architecture": "unet2d-small", "scheduler": {"beta_start": 0.0001}}
    if feature_stats:
        save_file({"layer1.mean": torch.zeros(4), "layer1.var": torch.ones(4)}, root / "feature_stats.safetensors")
    record = {"format": "secure-oneshot-model/v1", "site": "site-a", "artifacts": artifacts,
              "dp": {a: r.to_json() for a, r in (dp or {}).items()}, "training": {"epochs": 1}}
    (root / "record.json").write_text(json.dumps(record, indent=2))
    return root

"""The export candidate: a trained model directory, its tensors and which artifact each belongs to.

A model directory (written by ``secure-oneshot train``; tests build them by hand)::

    model/
      record.json                 training record: format, site, artifacts, dp, training
      classifier.safetensors      required
      generator.safetensors       optional
      feature_stats.safetensors   optional (DP feature statistics)

Payload tensor names are ``<file stem>/<tensor name>``.  BatchNorm running
statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) are the
separate artifact ``bn_statistics`` wherever they appear, because they are
computed from patient data and are what model-inversion attacks feed on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..bundle.safetensors_strict import PayloadLimits, parse_payload
from ..errors import ConfigError, ResourceError
from .dp import DpRecord

__all__ = ["ARTIFACT_FILES", "BN_SUFFIXES", "MODEL_RECORD_FORMAT", "ExportCandidate", "artifact_of", "load_model_dir"]

MODEL_RECORD_FORMAT = "secure-oneshot-model/v1"
ARTIFACT_FILES = {"classifier": "classifier", "generator": "generator", "feature_stats": "dp_feature_statistics"}
BN_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
_RECORD_KEYS = {"format", "site", "artifacts", "dp", "training"}


def artifact_of(payload_name: str) -> str:
    """``"classifier/layer1.0.bn1.running_mean"`` -> ``"bn_statistics"``; ``"generator/conv.weight"`` -> ``"generator"``."""
    stem = payload_name.split("/", 1)[0]
    if payload_name.endswith(BN_SUFFIXES):
        return "bn_statistics"
    return ARTIFACT_FILES.get(stem, f"unknown:{stem}")


@dataclass
class ExportCandidate:
    """Everything a site could send: tensors by payload name, plus the DP records and model metadata."""

    tensors: dict[str, torch.Tensor]
    dp: dict[str, DpRecord] = field(default_factory=dict)
    artifacts_meta: dict[str, Any] = field(default_factory=dict)
    site: str = ""

    def artifacts(self) -> dict[str, list[str]]:
        """artifact -> payload names present."""
        grouped: dict[str, list[str]] = {}
        for name in sorted(self.tensors):
            grouped.setdefault(artifact_of(name), []).append(name)
        return grouped

    def without(self, artifacts: set[str]) -> ExportCandidate:
        """A copy with whole artifacts left out (``export --without``): nothing is dropped silently."""
        kept = {n: t for n, t in self.tensors.items() if artifact_of(n) not in artifacts}
        return ExportCandidate(kept, {a: r for a, r in self.dp.items() if a not in artifacts}, self.artifacts_meta, self.site)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ResourceError(f"{path} not found", hint="a model directory needs record.json (written by `secure-oneshot train`)") from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a valid JSON training record ({e})") from e
    if not isinstance(record, dict) or record.get("format") != MODEL_RECORD_FORMAT:
        raise ConfigError(f"{path}: format must be {MODEL_RECORD_FORMAT!r}")
    unknown = set(record) - _RECORD_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return record


def _read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    payload = bytearray(path.read_bytes())
    # Strict parsing on the way out too: a site never sends what a server must refuse.
    tensors = parse_payload(payload, PayloadLimits(reject_nonfinite=True)).tensors
    return {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}


def _dp_records(raw: Mapping[str, Any], source: Path) -> dict[str, DpRecord]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'dp' must be an object keyed by artifact")
    return {artifact: DpRecord.from_json(obj, f"{source}: dp.{artifact}") for artifact, obj in raw.items()}


def load_model_dir(directory: str | os.PathLike[str]) -> ExportCandidate:
    """Read a model directory into an :class:`ExportCandidate`.

    Raises:
        ResourceError: the directory or its classifier is missing.
        ConfigError: record.json is invalid.
        TensorPayloadError: a safetensors file breaks the strict rules.
        PrivacyError: a DP record is malformed.
    """
    folder = Path(directory)
    record = _read_record(folder / "record.json")
    if not (folder / "classifier.safetensors").is_file():
        raise ResourceError(f"{folder}/classifier.safetensors not found", hint="point --model at a trained model directory")
    tensors: dict[str, torch.Tensor] = {}
    for stem in ARTIFACT_FILES:
        path = folder / f"{stem}.safetensors"
        if path.is_file():
            tensors.update(_read_tensors(path, stem))
    meta = record.get("artifacts", {})
    return ExportCandidate(tensors, _dp_records(record.get("dp", {}), folder / "record.json"), meta if isinstance(meta, dict) else {}, str(record.get("site", "")))

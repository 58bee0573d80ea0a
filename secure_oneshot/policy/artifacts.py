"""The export candidate: a trained model directory, its tensors and which artifact each belongs to.

A model directory (written by ``secure-oneshot train``; tests build them by hand)::

    model/
      record.json                 training record: format, site, artifacts, dp, training
      classifier.safetensors      required
      generator.safetensors       optional
      feature_stats.safetensors   optional (DP feature statistics)
      label_counts.safetensors    optional (DP label histogram: tensor ``counts``)

Payload tensor names are ``<file stem>/<tensor name>``.  Which artifact a
tensor belongs to is decided by *structure* (:mod:`.structure`): the
architecture declared in ``record.json`` says which tensors are classifier
parameters, which are BatchNorm running statistics (the separate artifact
``bn_statistics``: computed from patient data, what model-inversion attacks
feed on), and so on; anything it does not define is ``unknown`` and refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._internal.encoding import parse_strict_json
from ..bundle.safetensors_strict import PayloadLimits, parse_payload
from ..errors import ConfigError, ResourceError
from .dp import DpRecord
from .structure import Classification, classify_tensors

__all__ = ["ARTIFACT_FILES", "MAX_RECORD_BYTES", "MODEL_RECORD_FORMAT", "ExportCandidate", "load_model_dir"]

MODEL_RECORD_FORMAT = "secure-oneshot-model/v1"
ARTIFACT_FILES = ("classifier", "generator", "feature_stats", "label_counts")   # file stems read from a model directory
MAX_RECORD_BYTES = 1 << 20   # record.json is a small training record; a bigger one is not read
_RECORD_KEYS = {"format", "site", "artifacts", "dp", "training"}


@dataclass
class ExportCandidate:
    """Everything a site could send: tensors by payload name, plus the DP records and model metadata.

    Tensors are NumPy arrays as the strict parser builds them (``bundle.arrays``); torch tensors work too.
    """

    tensors: dict[str, Any]   # name -> numpy.ndarray
    dp: dict[str, DpRecord] = field(default_factory=dict)
    artifacts_meta: dict[str, Any] = field(default_factory=dict)   # record.json "artifacts", unreviewed (policy.metadata judges it)
    site: Any = ""
    training: dict[str, Any] = field(default_factory=dict)   # record.json "training" (read for the privacy statement only)
    _classification: Classification | None = field(default=None, repr=False, compare=False)

    @property
    def classification(self) -> Classification:
        """The structural classification of :attr:`tensors` against the declared architectures (computed once)."""
        if self._classification is None:
            self._classification = classify_tensors(self.tensors, self.artifacts_meta)
        return self._classification

    def artifact_of(self, payload_name: str) -> str:
        return self.classification.artifacts.get(payload_name, "unknown")

    def artifacts(self) -> dict[str, list[str]]:
        """artifact -> payload names present ("unknown" for tensors no declared architecture defines)."""
        return self.classification.grouped()

    def without(self, artifacts: set[str]) -> ExportCandidate:
        """A copy with whole artifacts left out (``export --without``): nothing is dropped silently."""
        kept = {n: t for n, t in self.tensors.items() if self.artifact_of(n) not in artifacts}
        return ExportCandidate(kept, {a: r for a, r in self.dp.items() if a not in artifacts}, self.artifacts_meta, self.site,
                               self.training)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError as e:
        raise ResourceError(f"{path} not found", hint="a model directory needs record.json (written by `secure-oneshot train`)") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the training record ({e.strerror})") from e
    if len(data) > MAX_RECORD_BYTES:
        raise ConfigError(f"{path}: training record larger than {MAX_RECORD_BYTES} bytes", hint="record.json holds a small training record, not data")
    try:
        record = parse_strict_json(data, canonical=False)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not a valid JSON training record ({e})") from e
    if not isinstance(record, dict) or record.get("format") != MODEL_RECORD_FORMAT:
        raise ConfigError(f"{path}: format must be {MODEL_RECORD_FORMAT!r}")
    unknown = set(record) - _RECORD_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    return record


def _read_tensors(path: Path, prefix: str) -> dict[str, Any]:
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
    tensors: dict[str, Any] = {}
    for stem in ARTIFACT_FILES:
        path = folder / f"{stem}.safetensors"
        if path.is_file():
            tensors.update(_read_tensors(path, stem))
    if not isinstance(record.get("artifacts", {}), dict):
        raise ConfigError(f"{folder / 'record.json'}: 'artifacts' must be an object keyed by artifact")
    training = record.get("training", {})
    return ExportCandidate(tensors, _dp_records(record.get("dp", {}), folder / "record.json"), record.get("artifacts", {}), record.get("site", ""),
                           training if isinstance(training, dict) else {})

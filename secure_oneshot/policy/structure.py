"""Classify tensors by structure: the declared architecture says what each tensor is.

From the allow-listed metadata (:mod:`.metadata`) the declared classifier,
generator and DP feature statistics are described tensor by tensor
(classifiers from the plain-Python layouts of :mod:`secure_oneshot.models.specs`,
so export and ingest import no ML library; a declared generator is described by
building the diffusers UNet on the meta device, :mod:`secure_oneshot.models.describe`).  A payload
tensor then belongs to:

* ``classifier`` -- a parameter of the declared classifier (``classifier/<name>``);
* ``bn_statistics`` -- a buffer of one of its BatchNorm modules;
* ``generator`` -- a tensor of the declared generator (``generator/<name>``);
* ``dp_feature_statistics`` -- ``feature_stats/<layer>.mean|var`` for a declared
  normalisation layer of the classifier (float32, one entry per channel);
* ``label_counts`` -- ``label_counts/counts``, the DP label histogram (float32,
  ``(num_classes,)``; ``num_classes`` must match the declared classifier's);
* ``unknown`` -- anything the declared architectures do not define (a renamed
  buffer, a trailing space, another case, an extra tensor): always refused.

A defined tensor whose shape or dtype differs from the architecture's is a
problem, and so is an incomplete artifact: an artifact leaves whole or not at
all (``export --without`` leaves it out whole).  The same classification runs
at the site (export) and at the server (ingest).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .metadata import described_sections

__all__ = ["UNKNOWN", "Classification", "expected_tensors", "classify_tensors"]

UNKNOWN = "unknown"
_ROLE_ARTIFACT = {"parameter": "classifier", "buffer": "classifier", "bn_statistics": "bn_statistics"}
_TORCH_FLOAT_CODES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64", "torch.int64": "I64"}


@dataclass(frozen=True)
class _Expected:
    artifact: str
    shape: tuple[int, ...]
    dtype: str          # safetensors dtype code


@dataclass
class Classification:
    """payload name -> artifact, plus every structural problem (subject, reason)."""

    artifacts: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)    # section -> why it describes nothing

    def grouped(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name in sorted(self.artifacts):
            groups.setdefault(self.artifacts[name], []).append(name)
        return groups


def _classifier_layout(meta: Mapping[str, Any]) -> Any:
    from ..models.specs import classifier_layout

    return classifier_layout(meta["architecture"], meta["in_channels"], meta["num_classes"], meta.get("norm", "batch"))


def _generator_config(meta: Mapping[str, Any]) -> Any:
    from ..models.generator import GeneratorConfig

    defaults = GeneratorConfig.__dataclass_fields__
    values = {}
    for key, value in meta["config"].items():
        kind = defaults[key].type
        values[key] = float(value) if kind == "float" else tuple(value) if isinstance(value, list) else value
    return GeneratorConfig(**values)


def _describe(section: str, meta: dict[str, Any], sections: dict[str, dict[str, Any]]) -> dict[str, _Expected]:
    if section == "classifier":
        entries = _classifier_layout(meta).entries
        return {f"classifier/{n}": _Expected(_ROLE_ARTIFACT[e.role], e.shape, e.dtype) for n, e in entries.items()}
    if section == "generator":
        from ..models import describe   # the UNet is diffusers' own: described by building it (imports torch)

        specs = describe.describe_generator(_generator_config(meta))
        return {f"generator/{n}": _Expected("generator", s.shape, _TORCH_FLOAT_CODES[str(s.dtype)]) for n, s in specs.items()}
    if section == "label_counts":
        classes = sections.get("classifier", {}).get("num_classes")
        if classes is not None and classes != meta["num_classes"]:
            raise ValueError(f"num_classes {meta['num_classes']} differs from the declared classifier's {classes}")
        classes = meta["num_classes"]
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 1:
            raise ValueError(f"num_classes must be a positive integer, not {classes!r}")
        # The DP label histogram: one float32 tensor of num_classes entries (noisy, unclamped).
        return {"label_counts/counts": _Expected("label_counts", (classes,), "F32")}
    if "classifier" not in sections:
        raise ValueError("they summarise the classifier's layers, and no classifier is described")
    layers = _classifier_layout(sections["classifier"]).norm_layers
    unknown = [layer for layer in meta["layers"] if layer not in layers]
    if unknown:
        raise ValueError(f"{unknown[:3]} are not normalisation layers of the declared classifier")
    return {f"feature_stats/{layer}.{stat}": _Expected("dp_feature_statistics", (layers[layer],), "F32")
            for layer in meta["layers"] for stat in ("mean", "var")}


def expected_tensors(artifacts_meta: Any) -> tuple[dict[str, _Expected], dict[str, str]]:
    """Every tensor the declared architectures define, and why a declared section describes nothing (if so)."""
    sections = described_sections(artifacts_meta)
    expected: dict[str, _Expected] = {}
    notes = {}
    for section, meta in sorted(sections.items()):
        try:
            expected.update(_describe(section, meta, sections))
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            reason = getattr(e, "message", None) or (f"missing {e}" if isinstance(e, KeyError) else str(e))
            notes[section] = f"the {section} metadata does not describe an architecture ({reason})"
    return expected, notes


def _shape_problem(tensor: Any, want: _Expected) -> str | None:
    if tuple(tensor.shape) != want.shape:
        return f"shape {list(tensor.shape)} where the declared architecture defines {list(want.shape)}"
    from ..bundle.arrays import dtype_code   # NumPy only once there are tensors to judge

    code = dtype_code(tensor)
    if code != want.dtype:
        return f"dtype {code} where the declared architecture defines {want.dtype}"
    return None


def classify_tensors(tensors: Mapping[str, Any], artifacts_meta: Any) -> Classification:
    """Classify ``tensors`` (payload names) against the architectures ``artifacts_meta`` declares."""
    expected, notes = expected_tensors(artifacts_meta)
    result = Classification(notes=notes)
    for name in sorted(tensors):
        want = expected.get(name)
        if want is None:
            result.artifacts[name] = UNKNOWN
            continue
        result.artifacts[name] = want.artifact
        problem = _shape_problem(tensors[name], want)
        if problem:
            result.problems.append((name, problem))
    by_artifact: dict[str, list[str]] = {}
    for name, want in expected.items():
        by_artifact.setdefault(want.artifact, []).append(name)
    for artifact, names in sorted(by_artifact.items()):
        present = [n for n in names if n in tensors]
        if present and len(present) < len(names):
            missing = sorted(set(names) - set(present))
            result.problems += [(n, f"missing: the declared architecture defines it ({artifact} leaves whole or not at all)") for n in missing]
    return result

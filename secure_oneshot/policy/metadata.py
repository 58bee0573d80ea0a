"""The metadata allow-list: which fields of a model's record may leave a site, of which type and size.

A bundle's signed manifest carries, besides the tensors, a little metadata the
server needs to rebuild the models (``meta.site`` and ``meta.artifacts``).
Only the fields listed here may leave, each with a type and bounds (short
strings of a safe character set, bounded integers, small nested objects of
known keys).  Everything else is refused, naming the field: free text in a
model record (a data path, a patient identifier) never reaches the server.

Every field gets one of three outcomes, shown by ``policy explain`` and
``export --dry-run``:

* ``send`` -- allow-listed, within bounds, and its artifact is being sent;
* ``keep`` -- a known field that stays at the site (the generator's training
  recipe, final loss and noise schedule, or the metadata of an artifact that
  is not being sent); it is never put into the manifest;
* ``refuse`` -- unknown, or out of type or bounds: the export is refused.

Values are judged in their signed-JSON form (FORMAT.md 1: reals as decimal
strings), which is also what the server receives and re-checks with the same
rules (:func:`review_received`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..models.specs import NORMS

__all__ = ["MetadataField", "MetadataReview", "signed_form", "review_metadata", "review_received", "described_sections", "DESCRIBED_BY"]

Check = Callable[[Any], "str | None"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_LAYER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,127}$")
_DECIMAL = re.compile(r"^-?(?:\d{1,20}(?:\.\d{0,20})?|\.\d{1,20})(?:[eE][-+]?\d{1,3})?$")


def signed_form(value: Any) -> Any:
    """Signed JSON carries reals as decimal strings (FORMAT.md 1); tuples become lists."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): signed_form(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [signed_form(v) for v in value]
    return value


# --- field rules ---------------------------------------------------------------------------------


def _name(v: Any) -> str | None:
    return None if isinstance(v, str) and _NAME.match(v) else "must be 1-64 characters of A-Z a-z 0-9 . _ + - (starting with a letter or digit)"


def _choice(*options: str) -> Check:
    return lambda v: None if v in options else f"must be one of {list(options)}"


def _integer(low: int, high: int) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and low <= v <= high
        return None if ok else f"must be an integer between {low} and {high}"
    return check


def _number(low: float, high: float) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, str) and bool(_DECIMAL.match(v)) and math.isfinite(float(v)) and low <= float(v) <= high
        return None if ok else f"must be a decimal number between {low:g} and {high:g}"
    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _int_list(max_len: int, low: int, high: int) -> Check:
    item = _integer(low, high)

    def check(v: Any) -> str | None:
        ok = isinstance(v, list) and len(v) <= max_len and all(item(x) is None for x in v)
        return None if ok else f"must be a list of at most {max_len} integers between {low} and {high}"
    return check


def _layer_list(v: Any) -> str | None:
    ok = isinstance(v, list) and 1 <= len(v) <= 512 and all(isinstance(x, str) and _LAYER.match(x) for x in v) and len(set(v)) == len(v)
    return None if ok else "must be a list of 1-512 distinct layer names (A-Z a-z 0-9 _ ., at most 128 characters each)"


_GENERATOR_CONFIG: dict[str, Check] = {
    "image_size": _integer(4, 1024), "in_channels": _integer(1, 16), "num_classes": _integer(1, 10_000),
    "block_out_channels": _int_list(8, 1, 4096), "layers_per_block": _integer(1, 16), "norm_num_groups": _integer(1, 1024),
    "num_train_timesteps": _integer(2, 100_000), "attention_levels": _int_list(8, 0, 7), "mid_attention": _boolean,
    "attention_head_dim": _integer(1, 1024), "dropout": _number(0.0, 1.0), "beta_schedule": _choice("linear", "scaled_linear", "squaredcos_cap_v2"),
    "beta_start": _number(0.0, 1.0), "beta_end": _number(0.0, 1.0), "clip_sample": _boolean, "pad_mode": _choice("reflect", "replicate", "constant"),
}


@dataclass(frozen=True)
class _Section:
    fields: dict[str, Check | dict[str, Check]]   # allow-listed; a dict is a nested object of known keys
    required: tuple[str, ...]
    site_only: tuple[str, ...] = ()                 # known, but never sent


_SECTIONS: dict[str, _Section] = {
    "classifier": _Section(
        {"architecture": _name, "in_channels": _integer(1, 16), "num_classes": _integer(1, 10_000), "norm": _choice(*NORMS),
         "image_size": _integer(4, 4096), "task": _choice("multi-label")},   # task: absent for one class per record
        required=("architecture", "in_channels", "num_classes")),
    "generator": _Section({"architecture": _name, "config": _GENERATOR_CONFIG}, required=("architecture", "config"),
                          site_only=("scheduler", "final_loss", "training")),
    "dp_feature_statistics": _Section({"layers": _layer_list}, required=("layers",)),
    "label_counts": _Section({"num_classes": _integer(1, 10_000)}, required=("num_classes",)),
}

DESCRIBED_BY = {"classifier": "classifier", "bn_statistics": "classifier", "dp_feature_statistics": "dp_feature_statistics",
                "generator": "generator", "label_counts": "label_counts"}
"""Artifact -> the metadata section that describes its tensors (feature statistics also need the classifier's)."""


def _sections_needed(artifacts: set[str]) -> set[str]:
    needed = {DESCRIBED_BY[a] for a in artifacts if a in DESCRIBED_BY}
    if "dp_feature_statistics" in needed:
        needed.add("classifier")  # its layers are the classifier's
    return needed


# --- review --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataField:
    """One line of the "metadata" section of ``policy explain``."""

    path: str        # e.g. "artifacts.classifier.architecture"
    value: str       # a short rendering
    outcome: str     # "send" | "keep" | "refuse"
    reason: str

    @property
    def allowed(self) -> bool:
        return self.outcome != "refuse"


@dataclass
class MetadataReview:
    """The fields judged, and the metadata that may be put into the manifest (signed form)."""

    fields: list[MetadataField]
    sent: dict[str, Any]

    @property
    def refused(self) -> list[MetadataField]:
        return [f for f in self.fields if not f.allowed]


def _show(value: Any) -> str:
    text = repr(value)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 48 else text[:45] + "..."


def _review_section(name: str, raw: Any, sending: bool, server: bool, out: list[MetadataField]) -> dict[str, Any] | None:
    section = _SECTIONS[name]
    where = f"artifacts.{name}"
    if not isinstance(raw, dict):
        out.append(MetadataField(where, _show(raw), "refuse", "must be an object"))
        return None
    kept: dict[str, Any] = {}
    for key in sorted(raw):
        value, path = raw[key], f"{where}.{key}"
        if key in section.site_only:
            outcome, reason = ("refuse", "site-only field: it must never leave the site") if server else ("keep", "stays at the site (not needed by the server)")
            out.append(MetadataField(path, _show(value), outcome, reason))
            continue
        rule = section.fields.get(key)
        if rule is None:
            out.append(MetadataField(path, _show(value), "refuse", "not an allow-listed metadata field"))
            continue
        if isinstance(rule, dict):
            good = _review_object(path, value, rule, sending, out)
            if good is not None:
                kept[key] = good
            continue
        problem = rule(value)
        outcome = "refuse" if problem else ("send" if sending else "keep")
        out.append(MetadataField(path, _show(value), outcome, problem or ("allow-listed" if sending else "artifact not sent")))
        if not problem:
            kept[key] = value
    for key in section.required:
        if key not in raw:
            out.append(MetadataField(f"{where}.{key}", "(missing)", "refuse", "required to describe the architecture"))
    return kept


def _review_object(path: str, value: Any, rules: dict[str, Check], sending: bool, out: list[MetadataField]) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        out.append(MetadataField(path, _show(value), "refuse", "must be an object"))
        return None
    kept = {}
    for key in sorted(value):
        rule = rules.get(key)
        problem = "not an allow-listed metadata field" if rule is None else rule(value[key])
        outcome = "refuse" if problem else ("send" if sending else "keep")
        out.append(MetadataField(f"{path}.{key}", _show(value[key]), outcome, problem or ("allow-listed" if sending else "artifact not sent")))
        if not problem:
            kept[key] = value[key]
    return kept


def _review(artifacts_meta: Any, site: Any, artifacts: set[str], server: bool) -> MetadataReview:
    fields: list[MetadataField] = []
    sent: dict[str, Any] = {}
    if site in (None, ""):
        fields.append(MetadataField("site", "(none)", "keep", "no site name recorded; none is sent"))
    else:
        site_problem = _name(site)
        fields.append(MetadataField("site", _show(site), "refuse" if site_problem else "send", site_problem or "allow-listed"))
        if site_problem is None:
            sent["site"] = site
    if not isinstance(artifacts_meta, dict):
        fields.append(MetadataField("artifacts", _show(artifacts_meta), "refuse", "must be an object keyed by artifact"))
        return MetadataReview(fields, sent)
    needed = _sections_needed(artifacts)
    described: dict[str, Any] = {}
    for name in sorted(artifacts_meta):
        if name not in _SECTIONS:
            fields.append(MetadataField(f"artifacts.{name}", _show(artifacts_meta[name]), "refuse", "not an artifact with allow-listed metadata"))
            continue
        good = _review_section(name, signed_form(artifacts_meta[name]), name in needed, server, fields)
        if good is not None and name in needed:
            described[name] = good
    for name in sorted(needed - set(artifacts_meta)):
        fields.append(MetadataField(f"artifacts.{name}", "(missing)", "refuse", "needed to describe the tensors being sent"))
    sent["artifacts"] = described
    return MetadataReview(fields, sent)


def review_metadata(artifacts_meta: Any, site: Any, sending: set[str]) -> MetadataReview:
    """Judge a model record's metadata at the site; ``sending``: the artifacts whose tensors would leave."""
    return _review(artifacts_meta, site, sending, server=False)


def review_received(meta: Mapping[str, Any], present: set[str]) -> MetadataReview:
    """Judge a received manifest's ``meta.site`` and ``meta.artifacts`` with the same rules (site-only fields refused)."""
    return _review(meta.get("artifacts", {}), meta.get("site", ""), present, server=True)


def described_sections(artifacts_meta: Any) -> dict[str, dict[str, Any]]:
    """The allow-listed, in-bounds fields of every known section (signed form): what structure checks build from."""
    if not isinstance(artifacts_meta, dict):
        return {}
    return _review(artifacts_meta, None, set(_SECTIONS), server=False).sent["artifacts"]

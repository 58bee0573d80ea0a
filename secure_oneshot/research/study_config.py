"""A study's configuration: the grid of cells (flag x alpha x epsilon x generator epsilon x withheld artifacts x
method) and seeds, parsed strictly from the study TOML (its format: :mod:`~secure_oneshot.research.experiment`).

What this module does not do: run anything.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._internal.compat import tomllib
from .._internal.strict_toml import MISSING, Problems, Table
from ..client.train import PRESETS as TRAIN_PRESETS
from ..data.medmnist_data import SIZES
from ..errors import ConfigError
from ..models.specs import config_default_architecture
from ..server.sources import METHODS, PROXY_METHODS
from ..server.study import LARGE_IMAGE
from ..server.study import PRESETS as SERVER_PRESETS
from ..server.class_evidence import EVIDENCE_CHOICES
from ..server.student_init import STUDENT_INITS
from ..server.weighting import WEIGHTINGS
from .study_table import alpha_label

__all__ = ["Study", "Cell", "study_from_text", "load_study", "WITHHOLDABLE", "NEEDS_GENERATOR"]

WITHHOLDABLE = ("bn_statistics", "dp_feature_statistics", "generator", "label_counts")
NEEDS_GENERATOR = ("generator", "mixed")


@dataclass(frozen=True)
class Study:
    name: str
    flags: tuple[str, ...]
    sites: int
    alphas: tuple[float, ...]
    seeds: tuple[int, ...]
    architecture: str
    site_preset: str
    site_epochs: int | None
    epsilons: tuple[float, ...]            # math.inf = no DP
    stats_epsilon: float | None            # None: the demo's share of each DP cell's epsilon
    server_preset: str
    methods: tuple[str, ...]
    server_epochs: int | None
    data_root: str | None = None
    privacy_audit: bool = False            # membership inference against every site model and the global model
    audit_shadows: int = 0                 # > 0: also offline LiRA with this many shadow models per site
    generator: tuple[tuple[str, Any], ...] | None = None   # [generator] training options (preset, epochs); None: no generator
    generator_epsilons: tuple[float, ...] = (math.inf,)
    withhold: tuple[tuple[str, ...], ...] = ((),)          # variants of what the sites leave out
    teacher_weighting: str | None = None                    # server.weighting scheme; None: the server preset's default
    prior_matching: bool = True                             # proxy cells: the student's class prior matched (class_prior)
    site_recalibration: bool = True                         # consensus with label counts: sites' decision points moved
    class_evidence: str = "require"                         # require | report (server.class_evidence): refused runs are rows too
    student_init: str | None = None                         # random | site (server.student_init); None: the job's default
    site_dp_preset: str = "dp"                              # the sites' recipe in DP cells (site_preset in the others)
    threshold_epsilon: float | None = None                  # DP binary cells: decision threshold budget; None: demo's share
    centralised: bool = False                               # also train one model on all records pooled (same recipe, epsilon)
    proxy_images: tuple[tuple[str, str], ...] = ()           # (flag, public proxy set) for the proxy methods
    public_fraction: float = 0.0                            # records set aside as the server's public images
    size: int = 28                                          # MedMNIST+ image size (<flag>_<size>.npz above 28 px)

    def cells(self) -> list[Cell]:
        generator_epsilons: tuple[float | None, ...] = self.generator_epsilons if self.generator is not None else (None,)
        return [Cell(f, a, e, m, s, g, w) for f, a, e, g, w, m, s in
                itertools.product(self.flags, self.alphas, self.epsilons, generator_epsilons, self.withhold, self.methods, self.seeds)]

    def check(self) -> Study:
        """Raise ``ConfigError`` for a grid that cannot run (a generator method without a released generator, or
        feature statistics that take a DP cell's whole epsilon)."""
        if self.size not in SIZES:
            raise ConfigError(f"study.size: {self.size!r} is not a MedMNIST+ size", hint=f"use one of {', '.join(map(str, SIZES))}")
        if self.server_preset == "paper" and self.size > LARGE_IMAGE:
            raise ConfigError(f"server.preset: paper at {self.size} px starts the student from ImageNet weights, which a study "
                              "does not take", hint="use another server preset (smoke, cpu, gpu)")
        too_small = [e for e in self.epsilons if self.stats_epsilon is not None and not math.isinf(e) and e <= self.stats_epsilon]
        if too_small:
            raise ConfigError(f"site.stats_epsilon {self.stats_epsilon:g} leaves nothing of epsilon {min(too_small):g} for training "
                              "(each cell's epsilon covers every release)", hint="lower site.stats_epsilon or leave it out "
                                                                                 "(default: a tenth of each cell's epsilon)")
        for method in set(self.methods) & set(NEEDS_GENERATOR):
            if self.generator is None:
                raise ConfigError(f"server.methods: {method!r} samples the sites' generators, but the study has no [generator]",
                                  hint="add a [generator] table (preset, epochs, epsilons)")
            if any("generator" in w for w in self.withhold):
                raise ConfigError(f"server.methods: {method!r} needs the generator, which policy.withhold leaves at the sites")
        proxies = dict(self.proxy_images)
        for flag in self.flags if set(self.methods) & set(PROXY_METHODS) else ():
            if flag not in proxies and self.public_fraction == 0:
                raise ConfigError(f"server.methods: a proxy method needs server.proxy_images for {flag}",
                                  hint=f'e.g. proxy_images = {{ {flag} = "OTHER_FLAG:train" }}: a public set no hospital holds')
            if flag in proxies and proxies[flag].partition(":")[0] == flag:   # every split of the study's own set is a site's or the test's
                raise ConfigError(f"server.proxy_images: {proxies[flag]!r} for {flag} is the hospitals' own data set",
                                  hint="name another MedMNIST set or a folder of public images")
        return self


@dataclass(frozen=True)
class Cell:
    flag: str
    alpha: float
    epsilon: float
    method: str
    seed: int
    generator_epsilon: float | None = None   # None: the sites train no generator
    withheld: tuple[str, ...] = ()           # artifacts the sites leave out of the export

    @property
    def id(self) -> str:
        generator = "" if self.generator_epsilon is None else f"-gen{_label(self.generator_epsilon)}"
        withheld = "".join(f"-no_{a}" for a in self.withheld)
        return f"{self.flag}-{alpha_label(self.alpha, 'a')}-eps{_label(self.epsilon)}{generator}{withheld}-{self.method}-s{self.seed}"


def _label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


# --- config --------------------------------------------------------------------------------------


def _positive_or(word: str, value: Any, where: str) -> float:
    """A grid value: a positive number, or ``word`` ("inf": no DP; "iid": an even split) read as math.inf."""
    if value == word:
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ConfigError(f"{where}: {value!r} is neither a positive number nor \"{word}\"")


def _epsilon(value: Any, where: str = "site.epsilons") -> float:
    return _positive_or("inf", value, where)


def _generator(table: dict[str, Any] | None) -> tuple[tuple[tuple[str, Any], ...] | None, tuple[float, ...]]:
    """[generator] -> (training options, epsilon grid); (None, (inf,)) when the table is absent."""
    if table is None:
        return None, (math.inf,)
    from ..models.generator import PRESETS as GENERATOR_PRESETS

    options = {"preset": _choice(table.get("preset", "cpu-small"), GENERATOR_PRESETS, "generator.preset"),
               **{k: table[k] for k in ("epochs", "batch_size", "lr") if k in table}}
    unknown = set(table) - {"epsilons", *options}
    if unknown:
        raise ConfigError(f"generator: unknown keys {sorted(unknown)}", hint="preset, epochs, batch_size, lr, epsilons")
    return tuple(sorted(options.items())), tuple(_epsilon(e, "generator.epsilons") for e in table.get("epsilons", ["inf"]))


def _withhold(policy: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    variants = policy.get("withhold", [[]])
    if not isinstance(variants, list) or not all(isinstance(v, list) for v in variants):
        raise ConfigError("policy.withhold: a list of lists of artifacts, e.g. [[], [\"bn_statistics\"]]")
    return tuple(tuple(sorted(_choice(a, WITHHOLDABLE, "policy.withhold") for a in set(v))) for v in variants)


def _size(study: dict[str, Any]) -> int:
    size = study.get("size", 28)
    if not isinstance(size, int) or isinstance(size, bool) or size not in SIZES:
        raise ConfigError(f"study.size: {size!r} is not a MedMNIST+ size", hint=f"use one of {', '.join(map(str, SIZES))}")
    return size


def _choice(value: str, allowed: Any, where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {sorted(allowed)}")
    return value


# Every key a study file may hold, per table, with its TOML type ("raw": checked where it is converted below).
# Unknown keys and wrong types are refused, all listed with their lines, so that a typo in a key
# ("prior_matchng = false") or a quoted flag ("centralised = \"false\"", which bool() reads as true) cannot
# silently change what a study measures.
_SCHEMA: dict[str, dict[str, str]] = {
    "study": {"name": "string", "flags": "list of strings", "sites": "integer", "alphas": "raw", "seeds": "list of numbers",
              "data_root": "string", "size": "raw", "centralised": "boolean", "public_fraction": "number"},
    "site": {"architecture": "string", "preset": "string", "dp_preset": "string", "epochs": "integer", "epsilons": "raw",
             "stats_epsilon": "number", "threshold_epsilon": "number"},
    "server": {"preset": "string", "methods": "list of strings", "epochs": "integer", "teacher_weighting": "string",
               "prior_matching": "boolean", "site_recalibration": "boolean", "proxy_images": "raw",
               "class_evidence": "string", "student_init": "string"},
    "generator": {"preset": "string", "epochs": "integer", "batch_size": "integer", "lr": "number", "epsilons": "raw"},
    "policy": {"withhold": "raw"},
    "privacy_audit": {"enabled": "boolean", "shadows": "integer"},
}
_RANGES: dict[str, Any] = {
    "study.sites": lambda v: None if v >= 1 else f"must be at least 1, got {v}",
    "study.seeds": lambda v: None if all(isinstance(s, int) for s in v) else f"must be whole numbers, got {v}",
    "study.public_fraction": lambda v: None if 0 <= v < 1 else f"must be in [0, 1), got {v}",
    "site.epochs": lambda v: None if v >= 1 else f"must be at least 1, got {v}",
    "site.stats_epsilon": lambda v: None if v > 0 else f"must be positive, got {v}",
    "site.threshold_epsilon": lambda v: None if v > 0 else f"must be positive, got {v}",
    "server.epochs": lambda v: None if v >= 1 else f"must be at least 1, got {v}",
    "privacy_audit.shadows": lambda v: None if v >= 0 else f"must be 0 or more, got {v}",
}


def _check_schema(doc: dict[str, Any], text: str, source: str) -> None:
    """Refuse unknown tables and keys and wrongly typed values, every one listed as ``file:line: key: problem``."""
    problems = Problems(source, text, hint="see the study format in examples/study-quick-cpu.toml; unknown keys are refused")
    top = Table(doc, "", problems)
    for name, keys in _SCHEMA.items():
        table = top.table(name, required=name == "study")
        for key, kind in keys.items():
            if kind == "raw":
                table.read.add(key)
            else:
                table.get(key, kind, MISSING if (name, key) == ("study", "name") else None, _RANGES.get(f"{name}.{key}"))
        table.finish()
    top.finish()
    problems.raise_if_any()


def study_from_text(text: str, source: str = "<study>") -> Study:
    """Parse a study config.  Raises ``ConfigError`` naming the field (every unknown key and wrong type at once)."""
    try:
        doc = tomllib.loads(text)
        _check_schema(doc, text, source)
        study, site, server = doc["study"], doc.get("site", {}), doc.get("server", {})
        generator, generator_epsilons = _generator(doc.get("generator"))
        return Study(
            name=str(study["name"]), flags=tuple(study.get("flags", ["pneumoniamnist"])), sites=int(study.get("sites", 5)),
            alphas=tuple(_positive_or("iid", a, "study.alphas") for a in study.get("alphas", [0.5])),
            seeds=tuple(int(s) for s in study.get("seeds", [0, 1, 2])),
            architecture=str(site.get("architecture", config_default_architecture(_size(study)))), size=_size(study),
            site_preset=_choice(site.get("preset", "cpu"), TRAIN_PRESETS, "site.preset"), site_epochs=site.get("epochs"),
            epsilons=tuple(_epsilon(e) for e in site.get("epsilons", ["inf"])), stats_epsilon=None if site.get("stats_epsilon") is None else float(site["stats_epsilon"]),
            server_preset=_choice(server.get("preset", "cpu"), SERVER_PRESETS, "server.preset"),
            methods=tuple(_choice(m, METHODS, "server.methods") for m in server.get("methods", ["inversion"])),
            server_epochs=server.get("epochs"), data_root=study.get("data_root"),
            privacy_audit=doc.get("privacy_audit", {}).get("enabled", False),
            audit_shadows=int(doc.get("privacy_audit", {}).get("shadows", 0)),
            generator=generator, generator_epsilons=generator_epsilons, withhold=_withhold(doc.get("policy", {})),
            teacher_weighting=None if "teacher_weighting" not in server else _choice(server["teacher_weighting"], WEIGHTINGS,
                                                                                     "server.teacher_weighting"),
            prior_matching=server.get("prior_matching", True),
            site_recalibration=server.get("site_recalibration", True),
            class_evidence=_choice(server.get("class_evidence", "require"), EVIDENCE_CHOICES, "server.class_evidence"),
            student_init=None if "student_init" not in server else _choice(server["student_init"], STUDENT_INITS,
                                                                           "server.student_init"),
            site_dp_preset=_choice(site.get("dp_preset", "dp"), TRAIN_PRESETS, "site.dp_preset"),
            threshold_epsilon=None if site.get("threshold_epsilon") is None else float(site["threshold_epsilon"]),
            centralised=study.get("centralised", False), public_fraction=float(study.get("public_fraction", 0.0)),
            proxy_images=tuple((str(flag), str(spec)) for flag, spec in dict(server.get("proxy_images", {})).items()),
        ).check()
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})") from e
    except KeyError as e:
        raise ConfigError(f"{source}: missing {e}", hint="see examples/study-quick-cpu.toml") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}", hint="see examples/study-quick-cpu.toml") from e


def load_study(path: str | Path) -> Study:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read study config {path}: {e.strerror}") from e
    return study_from_text(text, str(path))


# --- one cell ------------------------------------------------------------------------------------

"""Strict, typed reading of TOML tables with ``file:line: key.path`` problems, all reported at once.

Used by policy files and site configs: unknown keys, wrong types and
out-of-range values are errors, collected and raised as one ConfigError.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

from ..errors import ConfigError
from .locate import line_index, line_of

__all__ = ["Problems", "Table", "positive", "probability", "one_of", "all_of", "MISSING"]

MISSING = object()


class Problems:
    """Collects problems with their key paths, then raises one ConfigError."""

    def __init__(self, source: str, text: str, hint: str = "fix each listed key") -> None:
        self.source, self.lines, self.items, self.hint = source, line_index(text), [], hint  # type: ignore[var-annotated]

    def add(self, path: str, problem: str) -> None:
        self.items.append((line_of(self.lines, path), path, problem))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        rendered = [f"{self.source}:{line}: {path}: {problem}" for line, path, problem in sorted(self.items)]
        message = rendered[0] if len(rendered) == 1 else f"{self.source}: {len(rendered)} problems\n  " + "\n  ".join(rendered)
        raise ConfigError(message, hint=self.hint)


class Table:
    """Typed, strict access to one TOML table; remembers which keys were read."""

    def __init__(self, data: Any, path: str, problems: Problems) -> None:
        self.path, self.problems = path, problems
        if not isinstance(data, dict):
            problems.add(path, "must be a table")
            data = {}
        self.data, self.read = data, set()  # type: ignore[var-annotated]

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: str, default: Any = MISSING, check: Callable[[Any], str | None] | None = None) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is MISSING:
                self.problems.add(self._key(key), f"missing (expected {kind})")
            return None if default is MISSING else default
        value = self.data[key]
        problem = _type_problem(value, kind) or (check(value) if check else None)
        if problem:
            self.problems.add(self._key(key), problem)
            return None if default is MISSING else default
        return value

    def table(self, key: str, required: bool = True) -> Table:
        self.read.add(key)
        if key not in self.data and not required:
            return Table({}, self._key(key), self.problems)
        return Table(self.data.get(key), self._key(key), self.problems)

    def finish(self) -> None:
        for key in sorted(set(self.data) - self.read):
            self.problems.add(self._key(key), "unknown key (typo?): unknown keys are refused, so a typo cannot change what happens")


def _type_problem(value: Any, kind: str) -> str | None:
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "boolean": lambda v: isinstance(v, bool),
        "date-time": lambda v: isinstance(v, datetime) and v.tzinfo is not None,
        "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "list of numbers": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
        "list of tables": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    }
    if checks[kind](value):
        return None
    extra = " with a time zone, e.g. 2027-01-01T00:00:00Z" if kind == "date-time" else ""
    article = "an" if kind[0] in "aeiou" else "a"
    return f"must be {article} {kind}{extra}, got {type(value).__name__} {value!r}"


def positive(v: Any) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def probability(v: Any) -> str | None:
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v}"


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}; got {v!r}"


def all_of(options: tuple[str, ...] | list[str]) -> Callable[[Any], str | None]:
    def check(values: list[str]) -> str | None:
        bad = [v for v in values if v not in options]
        return f"unknown value(s) {bad}; allowed: {', '.join(options)}" if bad else None

    return check

"""Map TOML key paths to line numbers, so that policy errors point at ``file:line``.

``tomllib`` does not report positions, so we scan the text once: table headers
(``[a.b]``, ``[[a]]`` with their array index) and ``key = value`` lines give the
line where each dotted path is defined.  Good enough for hand-written policy
files; a path we cannot place falls back to its table's line, then to line 1.
"""

from __future__ import annotations

import re

__all__ = ["line_index"]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"]+(?:\s*\.\s*[A-Za-z0-9_\-\"]+)*)\s*=")


def _clean(path: str) -> str:
    return ".".join(part.strip().strip('"') for part in path.split("."))


def line_index(text: str) -> dict[str, int]:
    """``{"dp.classifier.max_epsilon": 31, "tensors[0].names": 20, ...}`` (1-based lines)."""
    index: dict[str, int] = {}
    arrays: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = _clean(header.group(2))
            if header.group(1) == "[[":
                arrays[name] = arrays.get(name, -1) + 1
                name = f"{name}[{arrays[name]}]"
            table = name
            index.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            key = _clean(assign.group(1))
            index.setdefault(f"{table}.{key}" if table else key, number)
    return index


def line_of(index: dict[str, int], path: str) -> int:
    """The line defining ``path``, else its closest enclosing table, else 1."""
    while path:
        if path in index:
            return index[path]
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return 1

"""Make attacker-chosen text safe to show on a terminal, in a table line, or in a log.

File names in a server inbox and the reasons derived from them are chosen by
whoever can write to the inbox.  Printed raw, a newline forges extra table
rows, an ANSI escape (``ESC [ 31 m``, ``ESC ] 0 ; title BEL``) recolours or
retitles the operator's terminal, and a bidi override (U+202E) makes
``evil<U+202E>bos.exe`` read as ``evilexe.sob``.  :func:`printable` returns
one line in which every such character is written as an escape instead:

- C0 and C1 controls, DEL: ``\\xNN``;
- bytes that were not valid UTF-8 (Python's ``surrogateescape`` turns them
  into U+DC80..U+DCFF when it decodes a file name): ``\\xNN``, the byte;
- format characters (bidi embeddings, overrides and isolates, zero-width
  joiners), line and paragraph separators, other surrogates, private-use and
  unassigned code points: ``\\uNNNN`` or ``\\UNNNNNNNN``;
- the backslash itself: ``\\\\``, so the escaped form is unambiguous.

Everything else (letters of any script, digits, punctuation, spaces) is kept.
The function only escapes; it neither validates nor rejects.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable", "printable_name", "shorten"]

# Unicode categories that can move the cursor, change the reading order, or hide
# text: controls, format characters, separators that break lines, surrogates,
# private use and unassigned code points.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_ELLIPSIS = "..."


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte of a non-UTF-8 name
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _safe(ch: str) -> bool:
    return ch != "\\" and unicodedata.category(ch) not in _UNSAFE_CATEGORIES


def printable(text: str, limit: int | None = None) -> str:
    """``text`` as one line with every unsafe character escaped (see the module docstring).

    Args:
        text: any string, including one decoded with ``surrogateescape``.
        limit: when given, the result is at most this many characters: a longer
            escaped text is cut and ends with ``...(+N)`` (N characters left out).

    >>> printable("a\\nb\\x1b[31m")
    'a\\\\x0ab\\\\x1b[31m'
    """
    out = "".join(ch if _safe(ch) else ("\\\\" if ch == "\\" else _escape(ch)) for ch in text)
    return out if limit is None else shorten(out, limit)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ending with ``...(+N)`` when cut.

    For text that is already printable (escaping it again would double every backslash).
    """
    if len(text) <= limit:
        return text
    # The marker is sized for the whole length, so the cut text plus marker never exceeds the limit.
    keep = max(0, limit - len(f"{_ELLIPSIS}(+{len(text)})"))
    return text[:keep] + f"{_ELLIPSIS}(+{len(text) - keep})"


def printable_name(name: str | bytes, limit: int | None = None) -> str:
    """A file name (``str`` from ``os.scandir`` or raw ``bytes``) made printable.

    Bytes are decoded as UTF-8 with ``surrogateescape``, so an invalid byte shows
    as ``\\xNN`` instead of raising.
    """
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    return printable(name, limit)

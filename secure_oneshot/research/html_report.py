"""Self-contained HTML pages for reviewers: one file, no scripts, nothing fetched.

Every report a person opens in a browser (the demo's, a study's, a privacy audit's, an audit log's) is built
from these pieces.  The page:

* holds everything it shows: inline CSS, images as ``data:image/png;base64`` URIs, no fonts, links, scripts
  or frames, and a Content-Security-Policy that forbids loading anything else, so a string that slipped
  through could still fetch nothing;
* escapes every string that came from data (site names, reasons, file names) with :func:`html.escape`;
  only :class:`Markup` built here is inserted as is;
* is structured for screen readers (``lang``, one ``h1``, ``h2`` sections, tables with ``caption`` and
  ``th scope``, ``alt`` text on every image) and prints to PDF cleanly (a print stylesheet).

Standard library only: no template engine, no numpy or torch.
"""

from __future__ import annotations

import base64
import html
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._internal.atomic import atomic_write_bytes

__all__ = ["Markup", "esc", "paragraph", "heading", "table", "image", "png_image", "banner", "definition_list", "section",
           "page", "write_page", "png_size", "PNG_SIGNATURE"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
"""The page may show its own inline styles and data: images, and nothing else."""


class Markup(str):
    """HTML built by this module: inserted without escaping.  Any other ``str`` is escaped."""


def number(value: object, digits: int = 3) -> str:
    """A metric as text: ``digits`` decimals, ``-`` for a missing, non-numeric or NaN value."""
    try:
        value = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def esc(value: object) -> Markup:
    """``value`` as HTML text: escaped unless it is already :class:`Markup`."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _join(parts: Iterable[object]) -> Markup:
    return Markup("".join(esc(p) for p in parts))


def paragraph(*parts: object, cls: str = "") -> Markup:
    return Markup(f"<p{_class(cls)}>{_join(parts)}</p>\n")


def heading(level: int, text: object, anchor: str = "") -> Markup:
    if level not in (1, 2, 3):
        raise ValueError(f"heading level must be 1, 2 or 3, got {level}")
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return Markup(f"<h{level}{ident}>{esc(text)}</h{level}>\n")


def _class(cls: str) -> str:
    return f' class="{esc(cls)}"' if cls else ""


def table(caption: object, headers: Sequence[object], rows: Iterable[Sequence[object]], *, row_headers: bool = True,
          numeric: Sequence[int] = (), nowrap: Sequence[int] = (), cls: str = "") -> Markup:
    """A data table: ``caption``, one header row (``th scope="col"``), and ``rows`` whose first cell is the row's
    header (``th scope="row"``) when ``row_headers``.  Columns listed in ``numeric`` are right-aligned, those in
    ``nowrap`` kept on one line (times)."""
    def style(i: int) -> str:
        return _class("num" if i in numeric else "nowrap" if i in nowrap else "")

    head = "".join(f'<th scope="col"{style(i)}>{esc(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            num = style(i)
            cells.append(f'<th scope="row"{num}>{esc(cell)}</th>' if i == 0 and row_headers else f"<td{num}>{esc(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return Markup(f'<div class="table-wrap"><table{_class(cls)}>\n<caption>{esc(caption)}</caption>\n'
                  f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>\n")


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk.

    Raises:
        ValueError: ``data`` is not a PNG.
    """
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_image(data: bytes, alt: str, caption: object = "", *, max_width: int = 900) -> Markup:
    """A PNG embedded as a data URI, in a ``figure`` with ``caption``; ``alt`` says what it shows (required).

    Raises:
        ValueError: ``data`` is not a PNG, or ``alt`` is empty.
    """
    if not alt.strip():
        raise ValueError("every image needs alt text")
    width, height = png_size(data)
    shown = min(width, max_width)
    size = f' width="{shown}" height="{max(1, round(height * shown / width))}"' if width else ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    figcaption = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return Markup(f'<figure><img src="{uri}" alt="{esc(alt)}"{size}>{figcaption}</figure>\n')


def image(path: Path, alt: str, caption: object = "") -> Markup:
    """:func:`png_image` of a PNG file; a missing or unreadable file becomes a visible note instead of a broken image."""
    try:
        return png_image(path.read_bytes(), alt, caption)
    except (OSError, ValueError) as e:
        return paragraph(f"(image {path.name} not shown: {e})", cls="note")


def banner(kind: str, title: object, *details: object) -> Markup:
    """A prominent status box (``kind`` ok | warn | bad); the title says the status in words, not only in colour."""
    if kind not in ("ok", "warn", "bad"):
        raise ValueError(f"banner kind must be ok, warn or bad, got {kind!r}")
    body = "".join(f"<p>{esc(d)}</p>" for d in details)
    return Markup(f'<div class="banner {kind}" role="status"><p class="banner-title"><strong>{esc(title)}</strong></p>{body}</div>\n')


def definition_list(items: Iterable[tuple[object, object]]) -> Markup:
    """Label/value pairs (settings, paths): ``<dl>``."""
    return Markup("<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>\n")


def section(title: object, *parts: object, anchor: str = "") -> Markup:
    return Markup(f"<section>\n{heading(2, title, anchor)}{_join(parts)}</section>\n")


STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; line-height: 1.45;
       color: #111; background: #fff; max-width: 72rem; margin: 0 auto; padding: 1.5rem; }
h1 { font-size: 1.7rem; margin: 0 0 .5rem; }
h2 { font-size: 1.3rem; margin: 2rem 0 .6rem; border-bottom: 1px solid #999; padding-bottom: .2rem; }
h3 { font-size: 1.1rem; margin: 1.2rem 0 .4rem; }
.subtitle { color: #333; margin-top: 0; }
.table-wrap { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: .92rem; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; caption-side: top; }
th, td { border: 1px solid #888; padding: .3rem .5rem; text-align: left; vertical-align: top; }
thead th { background: #e8e8e8; }
tbody th { font-weight: 600; background: #f6f6f6; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td { overflow-wrap: break-word; }
.nowrap { white-space: nowrap; }
figure { margin: 1rem 0; }
img { max-width: 100%; height: auto; border: 1px solid #ccc; }
figcaption { font-size: .9rem; color: #333; margin-top: .3rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; overflow-wrap: anywhere; }
code { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .9em; }
.banner { border: 3px solid; padding: .6rem 1rem; margin: 1rem 0; border-radius: 4px; }
.banner p { margin: .25rem 0; }
.banner-title { font-size: 1.25rem; }
.banner.ok { border-color: #1a7f37; background: #e9f7ee; }
.banner.warn { border-color: #9a6700; background: #fff8e1; }
.banner.bad { border-color: #b3261e; background: #fdecea; }
.note { color: #444; font-style: italic; }
footer { margin-top: 2.5rem; font-size: .85rem; color: #444; border-top: 1px solid #bbb; padding-top: .5rem; }
@page { margin: 15mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  table, figure, .banner { break-inside: avoid; page-break-inside: avoid; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  thead { display: table-header-group; }
  .table-wrap { overflow: visible; }
  table { font-size: 8pt; }
  th, td { padding: .15rem .25rem; }
  .num, .nowrap { white-space: normal; }  /* wide study tables wrap inside the page instead of running off it */
  .banner { background: none !important; }
  img { max-height: 22cm; }
}
"""


def page(title: str, *parts: object, subtitle: object = "", footer: object = "") -> str:
    """A whole HTML document: ``title`` as ``<title>`` and ``h1``, then ``parts`` (Markup, or text to escape)."""
    sub = paragraph(subtitle, cls="subtitle") if subtitle else ""
    foot = f"<footer>{esc(footer)}</footer>\n" if footer else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
            f"{heading(1, title)}{sub}{_join(parts)}</main>\n{foot}</body>\n</html>\n")


def write_page(path: Path, text: str) -> Path:
    """Write a page atomically (UTF-8) and return its path."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    return Path(path)

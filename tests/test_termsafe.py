"""Attacker-chosen names and reasons print as one escaped line: no forged rows, no terminal control."""

from __future__ import annotations

import pytest

from secure_oneshot._internal.termsafe import printable, printable_name, shorten


def test_a_forged_row_and_a_title_escape_print_as_one_escaped_line() -> None:
    name = "a.sob\n| accepted | forged.sob | row |\x1b]0;title\x07\x1b[31m.sob"
    shown = printable(name)
    assert shown == "a.sob\\x0a| accepted | forged.sob | row |\\x1b]0;title\\x07\\x1b[31m.sob"
    assert shown.isprintable() and len(shown.splitlines()) == 1


@pytest.mark.parametrize(("raw", "shown"), [
    ("\r\t\x00\x7f", "\\x0d\\x09\\x00\\x7f"),                # C0 and DEL
    ("\x85\x9b", "\\x85\\x9b"),                              # C1: NEL, CSI
    ("evil\u202egnp.sob", "evil\\u202egnp.sob"),              # right-to-left override
    ("a\u2066b\u2069\u200f", "a\\u2066b\\u2069\\u200f"),      # isolates, RLM
    ("x\u2028y\u2029", "x\\u2028y\\u2029"),                   # line / paragraph separators
    ("\ue000\U000f0000", "\\ue000\\U000f0000"),               # private use
    ("back\\slash", "back\\\\slash"),                         # the escape character itself
    ("Zürich-病院.sob", "Zürich-病院.sob"),                   # ordinary letters of any script stay
])
def test_unsafe_characters_are_escaped_and_ordinary_text_is_kept(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_bytes_that_are_not_utf8_show_as_hex_bytes() -> None:
    assert printable_name(b"bad-\xff\xfe.sob") == "bad-\\xff\\xfe.sob"
    assert printable_name(b"bad-\xff.sob".decode("utf-8", "surrogateescape")) == "bad-\\xff.sob"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate that is not an escaped byte


def test_a_length_cap_says_how_much_was_left_out() -> None:
    shown = printable("L" * 240 + "\n", limit=80)
    assert len(shown) <= 80 and shown.endswith(")") and "..." in shown
    left_out = int(shown.rsplit("(+", 1)[1].rstrip(")"))
    assert left_out == len(printable("L" * 240 + "\n")) - shown.index("...")
    assert shorten("short", 80) == "short"

"""The README's exit-status table matches the error classes (so the README stays truthful)."""

from __future__ import annotations

import re
from pathlib import Path

from secure_oneshot import errors

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_exit_status_table_matches_the_error_classes() -> None:
    documented = {int(code): name for code, name in re.findall(r"^\| (\d+) \| `(\w+)` \|", README, flags=re.M)}
    classes = {cls.exit_code: cls.__name__ for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.SecureOneshotError) and cls.__bases__ == (errors.SecureOneshotError,)}
    assert documented == classes
    assert set(errors.EXIT_CODES) == set(documented) | {0, 1, 2}

"""Run a snippet in a fresh interpreter (nothing imported yet) and read the JSON it prints: how the tests see what a
command's process really loads."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def json_from_fresh_python(code: str, timeout: float = 120) -> Any:
    """The JSON value ``code`` prints on stdout; fails the test (with its stderr) if the interpreter does not exit 0."""
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)

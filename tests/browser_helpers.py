"""Headless Chromium checks of a self-contained HTML page, through Chromium's command line only.

:func:`render` loads the page in an ``iframe`` of a small probe page (``--allow-file-access-from-files`` lets the
probe read the framed document's layout), dumps the probe's DOM after load, and reads:

* every image of the page: decoded (``naturalWidth``) and laid out visibly (box size, ``display``,
  ``visibility``, ``opacity``); every table: laid out visibly;
* the page's own load time (navigation start to the end of its load event);
* console messages (``--enable-logging=stderr``: Chromium logs each as ``INFO:CONSOLE``);
* network requests made by the page: ``URL_REQUEST_START_JOB`` events of Chromium's net log whose initiator
  is a page (the browser's own background requests have no origin), with every host name unresolvable.

The probe page is the only script involved; the page under test is loaded byte for byte as written.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["find_chromium", "render", "Rendered"]

WINDOW = (1280, 1600)
PROBE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>probe</title>
<style>html,body{margin:0;padding:0}#f{position:absolute;top:0;left:0;width:100%%;height:100%%;border:0}#out{display:none}</style>
</head><body><pre id="out">pending</pre><iframe id="f" title="page under test" src="%s" onload="probe()"></iframe>
<script>
function probe() {
  var out = {};
  try {
    var w = document.getElementById('f').contentWindow, d = w.document;
    function box(el) { var r = el.getBoundingClientRect(), s = w.getComputedStyle(el);
      return {width: r.width, height: r.height, visibility: s.visibility, display: s.display, opacity: s.opacity}; }
    out.images = [].map.call(d.images, function (i) { var b = box(i); b.complete = i.complete; b.natural_width = i.naturalWidth;
      b.alt = i.getAttribute('alt'); return b; });
    out.tables = [].map.call(d.querySelectorAll('table'), function (t) { var b = box(t); b.cls = t.className;
      b.caption = t.caption ? t.caption.textContent : null; return b; });
    out.title = d.title;
    out.h1 = [].map.call(d.querySelectorAll('h1'), function (h) { return h.textContent; });
    var nav = w.performance.getEntriesByType('navigation')[0];
    out.load_ms = nav ? nav.loadEventEnd - nav.startTime : null;
  } catch (e) { out.error = String(e); }
  document.getElementById('out').textContent = JSON.stringify(out);
}
</script></body></html>
"""


def find_chromium() -> str | None:
    """``$SECURE_ONESHOT_CHROMIUM``, else the first of chromium / chromium-browser / google-chrome on PATH."""
    explicit = os.environ.get("SECURE_ONESHOT_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)


@dataclass
class Rendered:
    layout: dict[str, Any]
    console: list[str]
    page_requests: list[str]
    screenshot: Path
    wall_s: float
    stderr: str = field(repr=False, default="")


def _page_requests(net_log: Path) -> list[str]:
    """URLs the page asked the network stack for (not the browser's own background requests)."""
    log = json.loads(net_log.read_text(encoding="utf-8", errors="replace") or "{}")
    start_job = log.get("constants", {}).get("logEventTypes", {}).get("URL_REQUEST_START_JOB")
    found = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") == start_job and "url" in params and params.get("initiator") != "not an origin":
            found.append(params["url"])
    return found


def render(chromium: str, page: Path, work: Path, name: str, timeout: float = 60.0) -> Rendered:
    """Load ``page`` in headless Chromium (module docstring); artifacts go under ``work``, named ``name``."""
    work.mkdir(parents=True, exist_ok=True)
    probe = work / f"{name}-probe.html"
    probe.write_text(PROBE % html.escape(page.resolve().as_uri(), quote=True), encoding="utf-8")
    screenshot, net_log = work / f"{name}-screenshot.png", work / f"{name}-netlog.json"
    argv = [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-extensions", "--allow-file-access-from-files",
            f"--user-data-dir={work / (name + '-profile')}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
            '--host-resolver-rules=MAP * ~NOTFOUND', f"--log-net-log={net_log}", "--enable-logging=stderr", "--v=0",
            f"--screenshot={screenshot}", "--dump-dom", probe.resolve().as_uri()]
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - started
    match = re.search(r'<pre id="out">(.*?)</pre>', done.stdout, re.S)
    layout = json.loads(html.unescape(match.group(1))) if match and match.group(1) != "pending" else {"error": "probe did not run",
                                                                                                       "stdout": done.stdout[-2000:]}
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(layout, console, _page_requests(net_log), screenshot, wall, done.stderr)

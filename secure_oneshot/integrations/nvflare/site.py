"""The site side of the NVFlare job, without NVFlare: where the site's settings are, and one answer per task.

The settings file is named by the hospital's own client environment (``SECURE_ONESHOT_NVFLARE_SITE``, or for the
simulator ``SECURE_ONESHOT_NVFLARE_SITES/<site-name>.toml``), never by the job or the task.  The answer is
:func:`secure_oneshot.integrations.site_export.export_for_request`, the same export as ``secure-oneshot export``
and the Flower client.  Only ``meta["secure-oneshot"]["request-id"]`` of the task is used; any other field in that
entry, and any parameter the server sends, is ignored and recorded in the site's audit log (``nvflare-request``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, SecureOneshotError
from ..site_export import export_for_request
from . import BUNDLE_PARAM, REASON_KEY, REQUEST_META, SITE_CONFIG_ENV, SITES_DIR_ENV, STATUS_KEY

__all__ = ["site_config_path", "answer_task", "refusal", "MAX_REASON_CHARS"]

MAX_REASON_CHARS = 1000
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HINT = f"set {SITE_CONFIG_ENV} in the NVFlare client's environment to the site's settings file"
log = logging.getLogger(__name__)


def site_config_path(site_name: str) -> Path:
    """The site's settings file, from the client's environment only (never from the job or a task)."""
    named = os.environ.get(SITE_CONFIG_ENV)
    if named:
        return Path(named)
    folder = os.environ.get(SITES_DIR_ENV)
    if folder and _SITE_NAME.fullmatch(site_name):
        return Path(folder) / f"{site_name}.toml"
    raise ConfigError(f"this NVFlare client has no {SITE_CONFIG_ENV} in its environment", hint=_HINT)


def refusal(reason: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reply that carries the reason and nothing else."""
    return {}, {STATUS_KEY: "refused", REASON_KEY: " ".join(str(reason).split())[:MAX_REASON_CHARS]}


def _request(meta: Mapping[str, Any], params: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    entry = meta.get(REQUEST_META)
    fields = dict(entry) if isinstance(entry, Mapping) else ({} if entry is None else {"<not a table>": entry})
    extra = [f"param:{str(name)[:64]}" for name in (params or {})]
    return fields, extra


def answer_task(site_name: str, meta: Mapping[str, Any], params: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export under the site's own settings and return the reply's (params, meta): the bundle, or a refusal.

    The bundle reply is ``({"bundle": uint8 array of the file}, {"status": "bundle", <public header fields>})``; a
    refusal by the policy (or any other expected failure) is ``({}, {"status": "refused", "reason": "<Class>: ..."})``
    and is in the site's audit log exactly as the CLI's refusal is.  Never raises.
    """
    try:
        fields, extra = _request(meta, params)
        exported = export_for_request(site_config_path(site_name), fields, extra, platform="nvflare", hint=_HINT)
    except SecureOneshotError as e:
        return refusal(f"{type(e).__name__}: {e.message}")
    except Exception as e:  # a bug: keep the traceback at the site, send the server one line
        log.exception("secure-oneshot export failed")
        return refusal(f"internal error at the site: {type(e).__name__}")
    return {BUNDLE_PARAM: np.frombuffer(exported.data, dtype=np.uint8)}, {STATUS_KEY: "bundle", **exported.header}

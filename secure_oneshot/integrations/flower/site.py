"""The site side of the Flower app, without Flower: where the site's settings are, and one export per request.

Everything that decides what leaves comes from a TOML file the hospital owns, named by the SuperNode's node config
(``flower-supernode --node-config "site-config='/etc/secure-oneshot/flower-site.toml'"``); the settings and the
export itself are the platform-neutral :mod:`secure_oneshot.integrations.site_export` (the same ``export_model`` as
``secure-oneshot export``).  The server's request may carry a request id, which the site binds into the bundle;
every other field it sends is ignored, and the attempt is recorded in the site's audit log (``flower-request``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..site_export import ExportedBundle, SiteSettings, read_settings
from ..site_export import export_for_request as _export_for_request
from ..site_export import load_site_settings as _load_site_settings

__all__ = ["SiteSettings", "load_site_settings", "read_settings", "site_config_path", "SITE_CONFIG_KEY", "SIMULATION_SITES_ENV",
           "ExportedBundle", "export_for_request"]

SITE_CONFIG_KEY = "site-config"
"""Node-config key naming the site's settings file (``flower-supernode --node-config "site-config='...'"``)."""
SIMULATION_SITES_ENV = "SECURE_ONESHOT_FLOWER_SITES"
"""In Flower's simulation the node config holds only ``partition-id``: the site's settings are then
``$SECURE_ONESHOT_FLOWER_SITES/site-<partition-id>.toml``, read from the machine that runs the virtual sites."""
_HINT = "check the node config's site-config"


def load_site_settings(path: Path) -> SiteSettings:
    """Read a site settings file strictly (unknown keys are errors); relative paths are relative to the file."""
    return _load_site_settings(path, _HINT)


def site_config_path(node_config: Mapping[str, Any]) -> Path:
    """The site's settings file, from the node config only (never from a message)."""
    named = node_config.get(SITE_CONFIG_KEY)
    if isinstance(named, str) and named:
        return Path(named)
    folder = os.environ.get(SIMULATION_SITES_ENV)
    partition = node_config.get("partition-id")
    if folder and isinstance(partition, int) and not isinstance(partition, bool):
        return Path(folder) / f"site-{partition}.toml"
    raise ConfigError(f"this node has no {SITE_CONFIG_KEY} in its node config",
                      hint=f"start it with flower-supernode --node-config \"{SITE_CONFIG_KEY}='/path/flower-site.toml'\"")


def export_for_request(node_config: Mapping[str, Any], request: Mapping[str, Any], extra_records: list[str]) -> ExportedBundle:
    """Answer one server request under the settings the node config names (``site_export.export_for_request``).

    Raises:
        SecureOneshotError: the export failed or was refused (the refusal is in the audit log, as for the CLI).
    """
    return _export_for_request(site_config_path(node_config), request, extra_records, platform="flower", hint=_HINT)

"""The site-owned NVFlare task result filter: only a refusal or a bundle this site exported may leave.

The hospital declares it in its own ``local/privacy.json`` (NVFlare's privacy scopes), so the job cannot remove it::

    {"scopes": [{"name": "secure-oneshot",
                 "task_result_filters": [{"path": "secure_oneshot.integrations.nvflare.site_filter.BundleResultFilter",
                                          "args": {"site_config": "/etc/secure-oneshot/nvflare-site.toml"},
                                          "direction": "out"}]}],
     "default_scope": "secure-oneshot"}

The checks are :func:`~secure_oneshot.integrations.nvflare.result_check.check_result`; a blocked result raises
NVFlare's ``ContentBlockedException`` (the client then sends an error code instead of the result) and is recorded in
the site's audit log (``nvflare-result-filter``, outcome ``refused``).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import ProcessType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from ... import audit
from ...errors import SecureOneshotError
from ..site_export import load_site_settings, site_identity
from .result_check import check_result
from .site import site_config_path

__all__ = ["BundleResultFilter"]


class BundleResultFilter(Filter):
    def __init__(self, site_config: str = ""):
        """``site_config``: the site's settings file; empty: the same file the client script uses (its environment)."""
        super().__init__()
        self.site_config = site_config

    def _settings_path(self, fl_ctx: FLContext) -> Path:
        return Path(self.site_config) if self.site_config else site_config_path(fl_ctx.get_identity_name())

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_process_type() in (ProcessType.SERVER_PARENT, ProcessType.SERVER_JOB):
            # a site's filter guards what leaves the site; at the server (the simulator copies one local/ folder to
            # every participant) it has nothing of the site's to guard, and the server's ingest judges the bytes
            return shareable
        try:
            settings = load_site_settings(self._settings_path(fl_ctx))
        except SecureOneshotError as e:
            raise ContentBlockedException(f"{type(e).__name__}: {e.message}") from None
        try:
            dxo = from_shareable(shareable)
            params, meta = dxo.data, dict(dxo.meta)
        except Exception:  # noqa: BLE001 - anything that is not a DXO is not a reply of ours
            params, meta = None, {}
        try:
            clean_params, clean_meta = check_result(settings, params if isinstance(params, dict) else {"<not a dict>": params}, meta)
        except SecureOneshotError as e:
            self._record(settings, e.message)
            raise ContentBlockedException(f"{type(e).__name__}: {e.message}") from None
        # what leaves is rebuilt from what was checked; NVFlare's own headers (task id, round) are kept
        DXO(DataKind.WEIGHTS, data=clean_params, meta=clean_meta).update_shareable(shareable)
        what = f"bundle {clean_meta.get('bundle_id')}" if clean_meta.get("status") == "bundle" else "a refusal"
        self.log_info(fl_ctx, f"secure-oneshot result filter: {what} may leave this site")
        return shareable

    def _record(self, settings, reason: str) -> None:
        try:
            audit.append_event(settings.audit_log, site_identity(settings), audit.AuditEvent(
                action="nvflare-result-filter", outcome="refused", reason=reason[:500]))
        except SecureOneshotError as e:  # the result is blocked either way; say why the record is missing
            self.logger.error("could not record the blocked result in the site's audit log: %s", e.message)

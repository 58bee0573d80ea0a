"""The study server's NVFlare controller: one ``export_bundle`` task per client, every reply kept, then ``ingest``.

NVFlare's one-round recipes hand results to an aggregator and discard them; this ``ModelController`` keeps each
site's reply instead.  It waits for ``nodes`` clients (``wait_seconds``), sends each its own task carrying only a
fresh request id (``meta["secure-oneshot"]["request-id"]``), records each reply as it arrives (``server.record_reply``:
a bundle goes into the inbox, a refusal keeps its reason), waits at most ``reply_seconds``, then runs the same ingest
as ``secure-oneshot ingest`` and writes ``nvflare-round.json``.  A site that is absent, times out, is blocked by its
own filter or answers with something that is not a bundle is reported and does not stop the round.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from ...errors import SecureOneshotError
from ...server.ingest import IngestFolders
from ..flower.server import distill_accepted, ingest_round
from . import REQUEST_META, TASK_NAME
from .server import RoundReport, SiteResult, load_server_settings, record_error, record_reply, write_report

__all__ = ["BundleController"]


class BundleController(ModelController):
    def __init__(self, server_config: str, persistor_id: str = ""):
        """``server_config``: the server's settings file (``examples/nvflare/nvflare-server.toml``)."""
        super().__init__(persistor_id=persistor_id, ignore_result_error=True)   # a failed site never ends the round
        self.server_config = server_config
        self.report: RoundReport | None = None
        self._by_site: dict[str, SiteResult] = {}
        self._folders: IngestFolders | None = None

    def run(self) -> None:
        try:
            self.report = self.run_round()
            self.info(f"secure-oneshot round: {len(self.report.sites)} site(s), {self.report.counts()}")
        except SecureOneshotError as e:  # one line, no traceback
            self.error(f"{type(e).__name__}: {e.message} (hint: {e.hint})")

    def _wait_for_clients(self, wanted: int, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while True:
            clients = sorted(self.sample_clients())
            if len(clients) >= wanted or time.monotonic() >= deadline or self.abort_signal.triggered:
                return clients
            time.sleep(0.5)

    def run_round(self) -> RoundReport:
        settings = load_server_settings(Path(self.server_config))
        identity = settings.identity()
        self._folders = IngestFolders.under(settings.server_dir)
        clients = self._wait_for_clients(settings.nodes, settings.wait_seconds)
        self._by_site = {name: SiteResult(name, i, secrets.token_hex(16)) for i, name in enumerate(clients)}
        for name, result in self._by_site.items():
            task = FLModel(params={}, meta={REQUEST_META: {"request-id": result.request_id}})
            self.send_model(task_name=TASK_NAME, data=task, targets=[name], timeout=max(1, int(settings.reply_seconds)),
                            callback=self._on_reply)
        deadline = time.monotonic() + settings.reply_seconds + 5
        while self.get_num_standing_tasks() and time.monotonic() < deadline and not self.abort_signal.triggered:
            time.sleep(0.2)
        report = RoundReport(settings.nodes, list(self._by_site.values()))
        ingest_round(settings, report, identity)
        if settings.distill and report.counts().get("accepted"):
            report.distilled = distill_accepted(settings, identity)
        write_report(settings, report)
        return report

    def _on_reply(self, result: FLModel) -> None:
        site = (result.meta or {}).get("client_name")
        entry = self._by_site.get(site) if isinstance(site, str) else None
        if entry is not None and self._folders is not None:
            record_reply(self._folders, entry, result.params, result.meta or {})

    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task=False) -> bool:
        # a result NVFlare marks as failed never reaches the callback: report it (blocked by the site's filter, or
        # the client script failed) instead of leaving the site as "no reply"
        rc = result.get_return_code()
        entry = self._by_site.get(client_name)
        if rc and rc != ReturnCode.OK and entry is not None and not is_unknown_task:
            record_error(entry, str(rc))
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

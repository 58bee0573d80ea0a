"""The study server's Flower ServerApp: one round of one query per node, then ``ingest`` (and optionally ``distill``).

The run config names the server's settings file (``flwr run . --run-config "server-config='/srv/flower-server.toml'"``);
the ServerApp waits for ``nodes`` SuperNodes (``wait_seconds``), sends each a ``query.export_bundle`` carrying only a
fresh request id, writes every bundle it receives into the inbox (``server.deliver``), runs the same ingest as
``secure-oneshot ingest`` and writes ``flower-round.json``.  A node that is offline, times out, refuses or answers
with something that is not a bundle is reported and does not stop the round.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from ...errors import ConfigError, SecureOneshotError
from ...server.ingest import IngestFolders
from . import QUERY_ACTION
from .server import NodeResult, RoundReport, ServerSettings, deliver, distill_accepted, ingest_round, load_server_settings, one_line, write_report
from .wire import bundle_bytes, request_content

__all__ = ["app", "run_round", "SERVER_CONFIG_KEY", "SERVER_CONFIG_ENV"]

SERVER_CONFIG_KEY = "server-config"
SERVER_CONFIG_ENV = "SECURE_ONESHOT_FLOWER_SERVER"
"""Where the run config has no ``server-config`` (Flower's ``run_simulation`` passes none): the server's settings file."""
log = logging.getLogger(__name__)


def _wait_for_nodes(grid: Grid, wanted: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def _collect(settings: ServerSettings, grid: Grid, nodes: list[int]) -> RoundReport:
    sent: dict[str, NodeResult] = {}
    messages = []
    for node in nodes:
        request_id = secrets.token_hex(16)
        message = Message(request_content(request_id), dst_node_id=node, message_type=f"query.{QUERY_ACTION}")
        messages.append(message)
        sent[str(node)] = NodeResult(node, request_id, "no reply", "no reply within reply_seconds (offline or timed out)")
    replies = list(grid.send_and_receive(messages, timeout=settings.reply_seconds))
    folders = IngestFolders.under(settings.server_dir)
    extra: list[NodeResult] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        first = sent.get(str(node))
        if first is None:
            continue  # a reply from a node that was not asked
        result = first
        if first.status != "no reply":  # a further answer: delivered too, so that the replay ledger judges it
            result = NodeResult(node, first.request_id, "no reply", copy=1 + sum(r.node_id == node for r in extra))
            extra.append(result)
        if reply.has_error():
            result.status, result.reason = "refused", one_line(reply.error.reason or f"error code {reply.error.code}")
            continue
        try:
            data = bundle_bytes(reply.content)
        except ValueError as e:
            result.status, result.reason = "malformed", one_line(str(e))
            continue
        result.status, result.reason = "delivered", ""
        deliver(folders, result, data)
    return RoundReport(settings.nodes, len(nodes), [*sent.values(), *extra])


def run_round(grid: Grid, context: Context) -> RoundReport:
    """The whole round (module docstring); returns the report it also writes to ``<server_dir>/flower-round.json``."""
    named = context.run_config.get(SERVER_CONFIG_KEY) or os.environ.get(SERVER_CONFIG_ENV)
    if not isinstance(named, str) or not named:
        raise ConfigError(f"the run config has no {SERVER_CONFIG_KEY}", hint=f"flwr run ... --run-config \"{SERVER_CONFIG_KEY}='/path/flower-server.toml'\"")
    settings = load_server_settings(Path(named))
    identity = settings.identity()
    nodes = _wait_for_nodes(grid, settings.nodes, settings.wait_seconds)
    report = _collect(settings, grid, nodes)
    ingest_round(settings, report, identity)
    if settings.distill and report.counts().get("accepted"):
        report.distilled = distill_accepted(settings, identity)
    path = write_report(settings, report)
    log.info("secure-oneshot round: %s (%s)", report.counts(), path)
    return report


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        report = run_round(grid, context)
        print(f"secure-oneshot round: {len(report.results)} node(s), {report.counts()}")
    except SecureOneshotError as e:  # one line, no traceback (the ServerApp's log shows it)
        print(f"error: {type(e).__name__}: {e.message}\nhint: {e.hint}")
        raise SystemExit(e.exit_code) from None

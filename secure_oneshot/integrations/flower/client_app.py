"""The hospital's Flower ClientApp: one query action, ``query.export_bundle``, answered by ``site.export_for_request``.

The reply is the bundle file as one opaque Array (``wire``), or an error reply whose reason is the one-line refusal
(e.g. ``PolicyViolationError: export refused by policy ...``) and nothing else; the site's audit log records the
export or the refusal exactly as ``secure-oneshot export`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from ...errors import SecureOneshotError
from . import QUERY_ACTION
from .site import export_for_request
from .wire import REQUEST_RECORD, reply_content

__all__ = ["app", "make_client_app", "answer", "INTERNAL_ERROR_CODE"]

INTERNAL_ERROR_CODE = 70   # an unexpected failure at the site (its details stay in the site's log, not on the wire)
log = logging.getLogger(__name__)


def _request_fields(message: Message) -> tuple[dict[str, Any], list[str]]:
    content = message.content
    request = content.get(REQUEST_RECORD)
    fields = dict(request.items()) if isinstance(request, ConfigRecord) else {}
    others = [name for name in content.keys() if name != REQUEST_RECORD]
    return fields, others


def answer(message: Message, context: Context) -> Message:
    """Export under the site's own settings (``context.node_config``) and reply with the bundle, or refuse."""
    try:
        fields, others = _request_fields(message)
        exported = export_for_request(context.node_config, fields, others)
        return Message(reply_content(exported.data, exported.header), reply_to=message)
    except SecureOneshotError as e:
        reason = f"{type(e).__name__}: {' '.join(e.message.split())}"
        return Message(error=Error(code=e.exit_code, reason=reason[:1000]), reply_to=message)
    except Exception as e:  # a bug: keep the traceback at the site, send the server one line
        log.exception("secure-oneshot export failed")
        return Message(error=Error(code=INTERNAL_ERROR_CODE, reason=f"internal error at the site: {type(e).__name__}"), reply_to=message)


Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp with the export query; ``mods`` are Flower mods around it (tests use one to tamper with replies)."""
    client = ClientApp()

    @client.query(QUERY_ACTION, mods=list(mods) or None)
    def export_bundle(message: Message, context: Context) -> Message:
        return answer(message, context)

    return client


app = make_client_app()

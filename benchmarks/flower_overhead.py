"""Bytes on the wire per site when the bundle travels as a Flower reply: bundle size + Flower's framing.

For each size, seals ``--sizes`` MiB of random float32 tensors (fixed seed, 8 tensors, one recipient) into a real
bundle, wraps the file's bytes exactly as the ClientApp does (``integrations.flower.wire.reply_content``: one uint8
Array with the bundle stype in an ArrayRecord, plus the public header in a ConfigRecord), and measures:

- ``objects``: the sum of Flower's deflated objects for the reply (message, RecordDict, records, the Array and its
  chunks), which is what Flower stores and moves between SuperNode and SuperLink;
- ``proto``: the serialized Message protobuf without its content (Flower pushes that, then the objects);
- the server's request message, both ways.

Overhead = objects + proto - bundle bytes.  HTTP/TLS framing of the transport is not counted (it is the same for any
payload of that size).  Requires the ``flower`` extra.

    python benchmarks/flower_overhead.py [--sizes 0.1,10,45] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def _messages(data: bytes, header: dict):
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from secure_oneshot.integrations.flower import QUERY_ACTION
    from secure_oneshot.integrations.flower.wire import reply_content, request_content

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # what a SuperLink sets for its task
    request = Message(request_content("0" * 32), dst_node_id=1, message_type=f"query.{QUERY_ACTION}")
    return request, Message(reply_content(data, header), reply_to=request)


def _wire(message) -> tuple[int, int]:
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = sum(len(o.deflate()) for o in get_all_nested_objects(message).values())
    # Flower pushes the message without its content, then each of its content's objects
    return objects, len(message_to_proto(remove_content_from_message(message)).SerializeToString())


def measure(mib: float, workdir: Path) -> dict:
    from secure_oneshot.bundle import inspect_bundle, seal_tensors
    from secure_oneshot.keys import Identity

    site, server = Identity.generate("site"), Identity.generate("server")
    rng = np.random.default_rng(0)
    per = max(1, int(mib * (1 << 20) / 4 / 8))
    tensors = {f"classifier/layer{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(8)}
    path = workdir / f"b-{mib}.sob"
    seal_tensors(tensors, path, sender=site, recipients=[server.public])
    data = path.read_bytes()
    h = inspect_bundle(path)
    header = {"bundle_id": h.bundle_id, "sender": h.sender, "recipients": list(h.recipient_ids), "created": h.created,
              "expires": h.expires, "policy_id": h.policy_id, "payload_size": h.payload_size}
    request, reply = _messages(data, header)
    objects, proto = _wire(reply)
    req_objects, req_proto = _wire(request)
    return {"mib": mib, "bundle_bytes": len(data), "reply_objects_bytes": objects, "reply_proto_bytes": proto,
            "reply_overhead_bytes": objects + proto - len(data), "overhead_percent": 100 * (objects + proto - len(data)) / len(data),
            "request_bytes": req_objects + req_proto}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,10,45", help="payload sizes in MiB, comma-separated (default 0.1,10,45)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("error: flwr is not installed\nhint: pip install -e \".[flower]\"", file=sys.stderr)
        return 3
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(float(s), Path(tmp)) for s in args.sizes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'payload MiB':>11} {'bundle bytes':>14} {'reply objects':>14} {'reply proto':>12} {'overhead':>9} {'%':>8} {'request':>8}")
    for r in rows:
        print(f"{r['mib']:11g} {r['bundle_bytes']:14,d} {r['reply_objects_bytes']:14,d} {r['reply_proto_bytes']:12,d} "
              f"{r['reply_overhead_bytes']:9,d} {r['overhead_percent']:8.4f} {r['request_bytes']:8,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

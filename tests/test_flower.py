"""The Flower app: the one transfer over Flower's Message API, judged by the same export and ingest as the files.

A small study (3 hospitals with small-cnn model directories, demo-style keys, a dpo-signed export policy, a server
ingest policy) is built once per test.  Most tests drive the real ClientApp and ServerApp objects through an
in-process Grid (``LoopbackGrid``: each node is a ClientApp called with its own Context and node config, as a
SuperNode does); one runs Flower's simulation engine when Ray is installed, and one (slow) a real SuperLink and
three SuperNodes on loopback.  Attacks: a server message that tries to steer the export, a bit flip in the reply's
Array, a node that answers twice, a node that answers garbage, a site whose policy refuses.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e \".[flower]\"")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from secure_oneshot import audit  # noqa: E402
from secure_oneshot.demo import create_identities, write_policies  # noqa: E402
from secure_oneshot.integrations.flower import BUNDLE_STYPE  # noqa: E402
from secure_oneshot.integrations.flower.client_app import make_client_app  # noqa: E402
from secure_oneshot.integrations.flower.server import REPORT_NAME  # noqa: E402
from secure_oneshot.integrations.flower.server_app import run_round  # noqa: E402
from secure_oneshot.integrations.flower.site import SIMULATION_SITES_ENV  # noqa: E402
from secure_oneshot.server.ingest import IngestFolders  # noqa: E402

from .model_helpers import make_real_model_dir  # noqa: E402

NAMES = ["hospital-1", "hospital-2", "hospital-3"]


@dataclass
class Study:
    root: Path
    site_configs: dict[str, Path]   # hospital -> its flower-site.toml
    server_config: Path
    ids: dict

    def audit_events(self, name: str) -> list[audit.AuditEvent]:
        return [r.event for r in audit.verify_log(self.root / "sites" / name / "audit.jsonl", self.ids[name].public)]

    @property
    def folders(self) -> IngestFolders:
        return IngestFolders.under(self.root / "server")

    def report(self) -> dict:
        return json.loads((self.root / "server" / REPORT_NAME).read_text())


def _refusing_policy(root: Path, export_policy: Path) -> Path:
    """The same signed policy text, except that classifiers may not leave: every export under it is refused."""
    text = export_policy.read_text().replace('classifier = "allow"', 'classifier = "deny"')
    assert 'classifier = "deny"' in text
    path = root / "policies" / "site-export-strict.toml"
    path.write_text(text)
    return path


def make_study(root: Path, refusing: str | None = None, nodes: int = 3) -> Study:
    ids, trust = create_identities(root, NAMES)
    export_policy, ingest_policy = write_policies(root, ids, NAMES)
    configs = {}
    for name in NAMES:
        site = root / "sites" / name
        model = make_real_model_dir(site / "model", site=name)
        policy = _refusing_policy(root, export_policy) if name == refusing else export_policy
        configs[name] = site / "flower-site.toml"
        configs[name].write_text(
            f'model_dir = "{model}"\npolicy = "{policy}"\nkey = "{root}/keys/{name}.key"\ntrust = "{trust}"\n'
            f'recipients = ["{root}/keys/server.pub"]\naudit_log = "audit.jsonl"\noutbox = "outbox"\n')
    server = root / "flower-server.toml"
    server.write_text(f'server_dir = "server"\nkey = "keys/server.key"\ntrust = "{trust}"\ningest_policy = "{ingest_policy}"\n'
                      f'nodes = {nodes}\nwait_seconds = 5\nreply_seconds = 60\n')
    return Study(root, configs, server, ids)


class LoopbackGrid(Grid):
    """Delivers each message to a ClientApp in this process, with that node's own Context (what a SuperNode does).

    ``mutate(node_id, reply)`` lets a test stand for the network or a hostile platform between site and server."""

    def __init__(self, nodes: dict[int, dict], client_app=None, mutate: Callable[[int, Message], list[Message]] | None = None):
        self.nodes, self.app, self.mutate = nodes, client_app or make_client_app(), mutate
        self._n = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover - deprecated API
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.nodes or self.nodes[node] is None:
                continue  # offline: no reply
            reply = self.app(message, Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(), run_config={}))
            replies += self.mutate(node, reply) if self.mutate else [reply]
        return replies

    def push_messages(self, messages):  # pragma: no cover - not used by the ServerApp
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError


def server_context(study: Study) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"server-config": str(study.server_config)})


def node_configs(study: Study) -> dict[int, dict]:
    return {1000 + i: {"site-config": str(study.site_configs[name])} for i, name in enumerate(NAMES)}


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps run and task ids on every Message it builds; a SuperLink or SuperNode sets them, here the test."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_round_accepts_every_site_with_audit_and_ledger(tmp_path):
    study = make_study(tmp_path)
    report = run_round(LoopbackGrid(node_configs(study)), server_context(study))
    assert report.counts() == {"accepted": 3}
    saved = study.report()
    assert saved["counts"] == {"accepted": 3} and saved["nodes_seen"] == 3
    accepted = sorted(p.name for p in study.folders.accepted.glob("*.sob"))
    assert len(accepted) == 3 and not list(study.folders.inbox.glob("*.sob"))
    for result in saved["results"]:
        assert result["request_id_bound"] is True   # the signed manifest answers this request, not another
        assert result["wire_bytes"] > 0
    ledger_ids = {r["ingest"]["bundle_id"] for r in saved["results"]}
    assert {f"{i}.sob" for i in ledger_ids} == set(accepted)
    for name in NAMES:
        events = [e for e in study.audit_events(name) if e.action == "export"]
        assert [e.outcome for e in events] == ["ok"]
        assert events[0].bundle_id in ledger_ids and events[0].details["request_id"]


def test_received_bytes_are_the_exported_file(tmp_path):
    """What the server ingests is byte for byte what the site's export wrote (its outbox copy)."""
    study = make_study(tmp_path)
    run_round(LoopbackGrid(node_configs(study)), server_context(study))
    outbox = {p.read_bytes() for name in NAMES for p in (tmp_path / "sites" / name / "outbox").glob("*.sob")}
    accepted = {p.read_bytes() for p in study.folders.accepted.glob("*.sob")}
    assert len(outbox) == 3 and outbox == accepted


def test_refusing_site_is_one_refusal_without_traceback(tmp_path):
    study = make_study(tmp_path, refusing="hospital-2")
    report = run_round(LoopbackGrid(node_configs(study)), server_context(study))
    assert report.counts() == {"accepted": 2, "refused": 1}
    refused = [r for r in report.results if r.status == "refused"]
    assert refused[0].node_id == 1001
    assert refused[0].reason.startswith("PolicyViolationError: export refused by policy demo/site-export")
    assert "Traceback" not in json.dumps(study.report())
    events = [e for e in study.audit_events("hospital-2") if e.action == "export"]
    assert [e.outcome for e in events] == ["refused"]   # recorded at the site, as the CLI's refusal is
    assert not list((tmp_path / "sites" / "hospital-2" / "outbox").glob("*.sob"))


def _hostile_server_grid(study: Study, request_fields: dict, extra_records: dict | None = None) -> LoopbackGrid:
    grid = LoopbackGrid(node_configs(study))
    plain = grid.send_and_receive

    def send(messages, *, timeout=None):
        for m in messages:
            for key, value in request_fields.items():
                m.content["request"][key] = value
            for name, record in (extra_records or {}).items():
                m.content[name] = record
        return plain(messages, timeout=timeout)

    grid.send_and_receive = send
    return grid


def test_server_message_cannot_steer_policy_recipients_artifacts_or_model(tmp_path):
    study = make_study(tmp_path, refusing="hospital-3")
    attacker = tmp_path / "attacker"
    hostile = {"policy": str(tmp_path / "policies" / "site-export.toml"), "recipients": str(attacker / "evil.pub"),
               "artifacts": "classifier,bn_statistics,generator", "model-dir": str(attacker / "other-model"),
               "without": "", "audit-log": str(attacker / "audit.jsonl")}
    grid = _hostile_server_grid(study, hostile, {"policy-override": ConfigRecord({"classifier": "allow"})})
    report = run_round(grid, server_context(study))
    # hospital-3's own (refusing) policy still decides: the server's policy path did not replace it
    assert report.counts() == {"accepted": 2, "refused": 1}
    assert not attacker.exists()
    for r in report.results:
        if r.status == "delivered":
            assert r.ingest["outcome"] == "accepted" and r.request_id_bound
    for name in NAMES:
        ignored = [e for e in study.audit_events(name) if e.action == "flower-request"]
        assert len(ignored) == 1 and ignored[0].outcome == "refused"
        assert set(ignored[0].details["ignored_fields"]) == {*hostile, "record:policy-override"}
        exports = [e for e in study.audit_events(name) if e.action == "export"]
        server_key = study.ids["server"].key_id
        assert len(exports) == 1 and exports[0].recipients == (server_key,)


def _flip_bit(node: int, reply: Message) -> list[Message]:
    if node != 1000 or reply.has_error():
        return [reply]
    array = reply.content["bundle"]["bundle"]
    data = bytearray(array.data)
    data[len(data) // 2] ^= 0x01
    reply.content["bundle"] = ArrayRecord({"bundle": Array(dtype="uint8", shape=(len(data),), stype=BUNDLE_STYPE, data=bytes(data))})
    return [reply]


def test_bit_flip_in_the_array_is_quarantined_like_a_tampered_file(tmp_path):
    study = make_study(tmp_path)
    report = run_round(LoopbackGrid(node_configs(study), mutate=_flip_bit), server_context(study))
    assert report.counts() == {"accepted": 2, "quarantined": 1}
    tampered = next(r for r in report.results if r.node_id == 1000)
    assert tampered.status == "delivered" and tampered.ingest["error"] == "BundleAuthError"
    reason_files = list(study.folders.quarantine.glob("*.reason.json"))
    assert len(reason_files) == 1
    assert json.loads(reason_files[0].read_text())["error"] == "BundleAuthError"
    # the same flip in a file dropped into the inbox gets the same verdict
    file_study = make_study(tmp_path / "files")
    outbox_file = next((tmp_path / "sites" / "hospital-1" / "outbox").glob("*.sob"))
    data = bytearray(outbox_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    from secure_oneshot.keys import load_trust_store
    from secure_oneshot.policy.load import load_ingest_policy
    from secure_oneshot.server.ingest import ingest_inbox
    folders = IngestFolders.under(tmp_path / "server-files")
    folders.inbox.mkdir(parents=True)
    (folders.inbox / "tampered.sob").write_bytes(bytes(data))
    outcome, = ingest_inbox(folders, study.ids["server"], load_trust_store(tmp_path / "keys" / "trust.toml"),
                            load_ingest_policy(tmp_path / "policies" / "server-ingest.toml"))
    assert (outcome.outcome, outcome.error) == ("quarantined", tampered.ingest["error"])
    assert outcome.reason == tampered.ingest["reason"]
    assert file_study  # built only to show an independent study does not interfere


def test_twice_garbage_and_offline_do_not_stop_the_round(tmp_path):
    study = make_study(tmp_path)
    nodes = node_configs(study)
    nodes[1002] = None  # offline

    def mutate(node: int, reply: Message) -> list[Message]:
        if node == 1000:   # answers twice: the same bundle again
            return [reply, Message(reply.content, reply_to=_as_request(reply))]
        if node == 1001:   # garbage instead of a bundle array
            reply.content["bundle"] = ArrayRecord({"bundle": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\0" * 4)})
        return [reply]

    report = run_round(LoopbackGrid(nodes, mutate=mutate), server_context(study))
    by_status = {}
    for r in report.results:
        by_status.setdefault(r.ingest.get("outcome", r.status), []).append(r)
    assert len(by_status["accepted"]) == 1 and len(by_status["malformed"]) == 1 and len(by_status["no reply"]) == 1
    replay, = by_status["quarantined"]
    assert replay.node_id == 1000 and replay.ingest["error"] == "ReplayError"
    assert "not a bundle array" in by_status["malformed"][0].reason


def _as_request(reply: Message) -> Message:
    """A stand-in for the original request (a second reply is built the way the first was)."""
    return Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)


def test_core_never_imports_flwr():
    """The core commands and the Flower app's Flower-free modules import no ``flwr`` (it is an optional extra)."""
    probe = ("import sys\nfrom secure_oneshot.cli import main\n"
             "import secure_oneshot.integrations.flower.site, secure_oneshot.integrations.flower.server\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('FLWR' if any(m.split('.')[0] == 'flwr' for m in sys.modules) else 'CLEAN')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "CLEAN", done.stderr


def test_request_id_is_checked_at_both_ends(tmp_path):
    from secure_oneshot.errors import ConfigError
    from secure_oneshot.integrations.flower.site import export_for_request

    study = make_study(tmp_path)
    with pytest.raises(ConfigError, match="request id"):
        export_for_request({"site-config": str(study.site_configs["hospital-1"])}, {"request-id": "../../etc"}, [])
    assert not list((tmp_path / "sites" / "hospital-1" / "outbox").glob("*.sob"))
    # a bundle whose signed manifest carries a malformed request id is refused by ingest
    from secure_oneshot.policy.evaluate import evaluate_ingest
    from secure_oneshot.policy.load import load_ingest_policy

    policy = load_ingest_policy(tmp_path / "policies" / "server-ingest.toml")
    ev = evaluate_ingest(policy, study.ids["hospital-1"].key_id, {}, {}, {"request_id": "a/b"}, 0)
    bad = [d for d in ev.denied if d.subject == "meta.request_id"]
    assert bad and "A-Za-z0-9" in bad[0].reason


def test_node_without_site_config_refuses_with_one_line(tmp_path):
    study = make_study(tmp_path)
    nodes = node_configs(study)
    nodes[1001] = {"partition-id": 1}   # no site-config and no simulation folder: nothing to export under
    report = run_round(LoopbackGrid(nodes), server_context(study))
    assert report.counts() == {"accepted": 2, "refused": 1}
    assert next(r for r in report.results if r.node_id == 1001).reason.startswith("ConfigError: this node has no site-config")

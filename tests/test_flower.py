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
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr", reason="the Flower extra is not installed: pip install -e \".[flower]\"")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from secure_oneshot.demo import create_identities, write_policies  # noqa: E402
from secure_oneshot.integrations.flower import BUNDLE_STYPE  # noqa: E402
from secure_oneshot.integrations.flower.client_app import make_client_app  # noqa: E402
from secure_oneshot.integrations.flower.server import REPORT_NAME  # noqa: E402
from secure_oneshot.integrations.flower.server_app import run_round  # noqa: E402
from secure_oneshot.integrations.flower.site import SIMULATION_SITES_ENV  # noqa: E402
from secure_oneshot.server.ingest import IngestFolders  # noqa: E402

from .model_helpers import make_real_model_dir  # noqa: E402
from .platform_helpers import PlatformStudy  # noqa: E402

NAMES = ["hospital-1", "hospital-2", "hospital-3"]


class Study(PlatformStudy):
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
    assert replay.copy == 1 and replay.request_id == by_status["accepted"][0].request_id
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


def test_a_round_in_which_no_site_replies_still_writes_its_report(tmp_path):
    """Every site offline: no bundle reaches the inbox, and the round still ends with its report (not an error
    about the inbox folder that no delivery created)."""
    study = make_study(tmp_path)
    assert not (study.root / "server" / "inbox").exists()
    report = run_round(LoopbackGrid({node: None for node in node_configs(study)}), server_context(study))
    assert report.counts() == {"no reply": 3}
    assert study.report()["counts"] == {"no reply": 3}


def test_flower_simulation_engine(tmp_path, monkeypatch):
    """Flower's own simulation engine (Ray) with 3 virtual SuperNodes: their node config holds only partition-id,
    so each virtual site reads site-<partition-id>.toml from the site-side folder named by the environment."""
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install \"flwr[simulation]\"")
    from flwr.simulation import run_simulation

    from secure_oneshot.integrations.flower.client_app import app as client_app
    from secure_oneshot.integrations.flower.server_app import SERVER_CONFIG_ENV
    from secure_oneshot.integrations.flower.server_app import app as server_app

    study = make_study(tmp_path, refusing="hospital-3")
    sites = tmp_path / "simulation-sites"
    sites.mkdir()
    for i, name in enumerate(NAMES):
        site = study.site_configs[name].parent   # relative paths in a settings file are relative to the file: make them absolute
        text = study.site_configs[name].read_text().replace('"audit.jsonl"', f'"{site}/audit.jsonl"').replace('"outbox"', f'"{site}/outbox"')
        (sites / f"site-{i}.toml").write_text(text)
    monkeypatch.setenv(SIMULATION_SITES_ENV, str(sites))
    monkeypatch.setenv(SERVER_CONFIG_ENV, str(study.server_config))
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
    saved = study.report()
    assert saved["counts"] == {"accepted": 2, "refused": 1}
    assert all(r["request_id_bound"] for r in saved["results"] if r["status"] == "delivered")
    for name in NAMES:
        outcomes = [e.outcome for e in study.audit_events(name) if e.action == "export"]
        assert outcomes == (["refused"] if name == "hospital-3" else ["ok"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate: Callable[[], bool], seconds: float, what: str, logs: list[Path]) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.exists())
            pytest.fail(f"{what} not within {seconds:.0f} s\n{tails}")
        time.sleep(0.5)


@pytest.mark.slow
def test_real_superlink_and_three_supernodes_on_loopback(tmp_path):
    """A real deployment: a SuperLink and 3 SuperNodes as separate processes on loopback, each SuperNode with its
    own node config, the app submitted with ``flwr run``; hospital-3's policy refuses.  Every process is stopped."""
    import os
    import shutil
    import signal

    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH")
    study = make_study(tmp_path, refusing="hospital-3")
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, *argv: str) -> None:
        log = tmp_path / f"{name}.log"
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                          start_new_session=True, stdin=subprocess.DEVNULL))

    try:
        # the app's code is the installed secure_oneshot: no per-run environment (Flower would try to install it with uv);
        # a state file, not ":memory:" (Flower 1.42's in-memory SQLite state fails under concurrent pulls)
        start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
              "--port", str(port), "--database", str(tmp_path / "superlink-state.db"))
        _wait_for(lambda: b"Uvicorn running" in logs[0].read_bytes(), 120, "the SuperLink", logs)
        for i, name in enumerate(NAMES):
            start(name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(_free_port()),
                  "--node-config", f"site-config='{study.site_configs[name]}'")
        app = tmp_path / "app"
        shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "flower", app)
        submitted = subprocess.run(["flwr", "run", str(app), "loopback", "--run-config", f"server-config='{study.server_config}'"],
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        report = tmp_path / "server" / REPORT_NAME
        _wait_for(report.exists, 300, "the round report", logs)
        saved = study.report()
        assert saved["counts"] == {"accepted": 2, "refused": 1}
        refused, = [r for r in saved["results"] if r["status"] == "refused"]
        assert refused["reason"].startswith("PolicyViolationError: export refused by policy")
        assert all(r["request_id_bound"] for r in saved["results"] if r["status"] == "delivered")
        for log in logs:
            assert "Traceback" not in log.read_text(errors="replace"), log.name
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@pytest.mark.slow
def test_round_can_distil_the_accepted_bundles(tmp_path):
    """``distill = true``: after ingest the same ``run_distillation`` as ``secure-oneshot distill`` runs on accepted/
    (about a minute on 2 CPU cores, mostly synthesis, whatever the epochs)."""
    study = make_study(tmp_path, refusing="hospital-2")
    with open(study.server_config, "a") as f:
        f.write('distill = true\ndistill_preset = "smoke"\ndistill_epochs = 1\n')
    report = run_round(LoopbackGrid(node_configs(study)), server_context(study))
    assert report.counts() == {"accepted": 2, "refused": 1}
    assert report.distilled and (Path(report.distilled) / "global.safetensors").is_file()
    assert study.report()["distilled"] == report.distilled

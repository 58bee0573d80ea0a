"""The NVFlare job: the one transfer through NVFlare's Client API objects, a site-owned result filter and a
``ModelController`` that keeps every reply, judged by the same export and ingest as the files.

The tests build a small study (3 hospitals with small-cnn model directories, demo-style keys, a dpo-signed export
policy, a server ingest policy) and drive the real objects: the client script's ``answer`` builds the reply
``FLModel``, NVFlare's ``FLModelUtils`` turns it into the ``Shareable`` that travels, the site's ``BundleResultFilter``
processes it as NVFlare's task-result filter chain does, and the ``BundleController`` records what arrives and runs
ingest.  Attacks: a site whose policy refuses, a bit flip on the wire, results that are not a bundle of this site,
a server task that tries to steer the export.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nvflare", reason="the NVFlare extra is not installed: pip install -e \".[nvflare]\"")

from nvflare.apis.filter import ContentBlockedException  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType  # noqa: E402
from nvflare.app_common.utils.fl_model_utils import FLModelUtils  # noqa: E402

from secure_oneshot.demo import create_identities, write_policies  # noqa: E402
from secure_oneshot.integrations.nvflare import BUNDLE_PARAM, REQUEST_META, SITES_DIR_ENV  # noqa: E402
from secure_oneshot.integrations.nvflare.client import answer  # noqa: E402
from secure_oneshot.integrations.nvflare.controller import BundleController  # noqa: E402
from secure_oneshot.integrations.nvflare.server import REPORT_NAME, RoundReport, SiteResult, write_report  # noqa: E402
from secure_oneshot.integrations.nvflare.site_filter import BundleResultFilter  # noqa: E402
from secure_oneshot.integrations.flower.server import ingest_round, load_server_settings  # noqa: E402

from .model_helpers import make_real_model_dir  # noqa: E402
from .platform_helpers import PlatformStudy  # noqa: E402

NAMES = ["hospital-1", "hospital-2", "hospital-3"]


Study = PlatformStudy


def make_study(root: Path, monkeypatch, refusing: str | None = None) -> Study:
    ids, trust = create_identities(root, NAMES)
    export_policy, ingest_policy = write_policies(root, ids, NAMES)
    (root / "site-settings").mkdir()
    configs = {}
    for name in NAMES:
        site = root / "sites" / name
        model = make_real_model_dir(site / "model", site=name)
        policy = export_policy
        if name == refusing:   # the same signed policy text, except that classifiers may not leave
            policy = root / "policies" / "site-export-strict.toml"
            policy.write_text(export_policy.read_text().replace('classifier = "allow"', 'classifier = "deny"'))
        configs[name] = root / "site-settings" / f"{name}.toml"
        configs[name].write_text(
            f'model_dir = "{model}"\npolicy = "{policy}"\nkey = "{root}/keys/{name}.key"\ntrust = "{trust}"\n'
            f'recipients = ["{root}/keys/server.pub"]\naudit_log = "{site}/audit.jsonl"\noutbox = "{site}/outbox"\n')
    server = root / "nvflare-server.toml"
    server.write_text(f'server_dir = "server"\nkey = "keys/server.key"\ntrust = "{trust}"\ningest_policy = "{ingest_policy}"\n'
                      f'nodes = 3\nwait_seconds = 5\nreply_seconds = 60\n')
    monkeypatch.setenv(SITES_DIR_ENV, str(root / "site-settings"))   # the simulator's layout: <site-name>.toml
    return Study(root, configs, server, ids)


def site_reply(study: Study, name: str, request_id: str, task_meta: dict | None = None):
    """One site's turn: the client script answers, then the site's own filter processes the Shareable that leaves."""
    task = FLModel(params={}, meta={REQUEST_META: {"request-id": request_id}, **(task_meta or {})})
    shareable = FLModelUtils.to_shareable(answer(task, name))
    return BundleResultFilter(site_config=str(study.site_configs[name])).process(shareable, FLContext())


def controller_for(study: Study) -> BundleController:
    """The controller's reply handling without an NVFlare engine (what ``run_round`` sets up before sending)."""
    controller = BundleController(server_config=str(study.server_config))
    controller._folders = study.folders
    controller._by_site = {name: SiteResult(name, i, f"req{i:04d}") for i, name in enumerate(NAMES)}
    return controller


def arrive(controller: BundleController, name: str, shareable) -> None:
    """What ``BaseModelController._process_result`` hands the callback: the FLModel plus the client's name."""
    model = FLModelUtils.from_shareable(shareable)
    model.meta["client_name"] = name
    controller._on_reply(model)


def finish(study: Study, controller: BundleController) -> RoundReport:
    settings = load_server_settings(study.server_config)
    report = RoundReport(settings.nodes, list(controller._by_site.values()))
    ingest_round(settings, report, settings.identity())
    write_report(settings, report)
    return report


def test_three_sites_one_refusal(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch, refusing="hospital-2")
    controller = controller_for(study)
    for name, entry in controller._by_site.items():
        arrive(controller, name, site_reply(study, name, entry.request_id))
    report = finish(study, controller)
    assert report.counts() == {"accepted": 2, "refused": 1}
    refused = controller._by_site["hospital-2"]
    assert refused.reason.startswith("PolicyViolationError: export refused by policy demo/site-export")
    saved = (study.root / "server" / REPORT_NAME).read_text()
    assert "Traceback" not in saved and json.loads(saved)["counts"] == {"accepted": 2, "refused": 1}
    for name in ("hospital-1", "hospital-3"):
        entry = controller._by_site[name]
        assert entry.request_id_bound is True and entry.ingest["outcome"] == "accepted"
        exports = [e for e in study.audit_events(name) if e.action == "export"]
        assert [e.outcome for e in exports] == ["ok"] and exports[0].bundle_id == entry.ingest["bundle_id"]
        # the server received byte for byte the file the site's export wrote
        outbox = list((tmp_path / "sites" / name / "outbox").glob("*.sob"))
        assert [p.read_bytes() for p in outbox] == [(study.folders.accepted / f"{entry.ingest['bundle_id']}.sob").read_bytes()]
    assert [e.outcome for e in study.audit_events("hospital-2") if e.action == "export"] == ["refused"]
    assert not list((tmp_path / "sites" / "hospital-2" / "outbox").glob("*.sob"))


def test_bit_flip_on_the_wire_is_quarantined_by_ingest(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    controller = controller_for(study)
    for name, entry in controller._by_site.items():
        shareable = site_reply(study, name, entry.request_id)
        if name == "hospital-3":   # the platform (or anyone on the path) flips one bit of the stream
            model = FLModelUtils.from_shareable(shareable)
            data = bytearray(model.params[BUNDLE_PARAM].tobytes())
            data[len(data) // 2] ^= 0x01
            model.params[BUNDLE_PARAM] = np.frombuffer(bytes(data), dtype=np.uint8)
            shareable = FLModelUtils.to_shareable(model)
        arrive(controller, name, shareable)
    report = finish(study, controller)
    assert report.counts() == {"accepted": 2, "quarantined": 1}
    tampered = controller._by_site["hospital-3"]
    assert tampered.ingest["error"] == "BundleAuthError"
    assert tampered.ingest["stored_as"].startswith("quarantine/") and (study.root / "server" / tampered.ingest["stored_as"]).exists()
    assert not list(study.folders.inbox.glob("*.sob"))


def test_absent_and_malformed_sites_do_not_stop_the_round(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    controller = controller_for(study)
    arrive(controller, "hospital-1", site_reply(study, "hospital-1", "req0000"))
    garbage = FLModelUtils.to_shareable(FLModel(params={"weights": np.zeros(4, dtype=np.float32)}, meta={"status": "bundle"}))
    arrive(controller, "hospital-2", garbage)   # a site without the filter, answering something else
    report = finish(study, controller)           # hospital-3 never answered
    assert report.counts() == {"accepted": 1, "malformed": 1, "no reply": 1}
    assert "not one 'bundle' uint8 array" in controller._by_site["hospital-2"].reason
    assert controller._by_site["hospital-3"].reason.startswith("no reply within reply_seconds")


def test_blocked_result_is_reported_as_an_error_code(tmp_path, monkeypatch):
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.shareable import make_reply

    study = make_study(tmp_path, monkeypatch)
    controller = controller_for(study)
    controller.fl_ctx = FLContext()
    accepted = controller._accept_train_result("hospital-2", make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR), FLContext())
    assert accepted is False   # NVFlare's own handling: the failed result is ignored, the round goes on
    entry = controller._by_site["hospital-2"]
    assert entry.status == "error" and ReturnCode.TASK_RESULT_FILTER_ERROR in entry.reason


def _filter(study: Study, name: str) -> BundleResultFilter:
    return BundleResultFilter(site_config=str(study.site_configs[name]))


def test_filter_blocks_results_that_are_not_this_sites_bundle(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    flt = _filter(study, "hospital-1")

    def blocked(params, meta, match):
        with pytest.raises(ContentBlockedException, match=match):
            flt.process(FLModelUtils.to_shareable(FLModel(params=params, params_type=ParamsType.FULL, meta=meta)), FLContext())

    # plain model weights (what an ordinary training script would send)
    blocked({"conv.weight": np.zeros((2, 2), dtype=np.float32)}, {}, "not a secure-oneshot reply")
    blocked({"conv.weight": np.zeros(8, dtype=np.uint8)}, {"status": "bundle"}, "exactly one parameter")
    blocked({BUNDLE_PARAM: np.frombuffer(b"not a bundle at all", dtype=np.uint8)}, {"status": "bundle"}, "not a bundle")
    blocked({BUNDLE_PARAM: np.zeros(4, dtype=np.float32)}, {"status": "bundle"}, "not a 1-D uint8 array")
    blocked({"x": np.zeros(3, dtype=np.uint8)}, {"status": "refused", "reason": "no"}, "a refusal carries parameters")
    # a genuine bundle, but another site's: hospital-1's filter does not let it leave
    other = FLModelUtils.from_shareable(site_reply(study, "hospital-2", "req1"))
    blocked(other.params, {"status": "bundle"}, "is not this site's key")
    # hospital-1's own bundle whose outbox copy differs from the bytes (the script swapped in another file)
    mine = FLModelUtils.from_shareable(site_reply(study, "hospital-1", "req2"))
    for p in (tmp_path / "sites" / "hospital-1" / "outbox").glob("*.sob"):
        p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1]))
    blocked(mine.params, {"status": "bundle"}, "not byte for byte the file")
    blocks = [e for e in study.audit_events("hospital-1") if e.action == "nvflare-result-filter"]
    assert len(blocks) >= 7 and all(e.outcome == "refused" for e in blocks)


def test_filter_requires_the_sites_current_policy(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    mine = FLModelUtils.from_shareable(site_reply(study, "hospital-1", "req3"))
    policy = study.root / "policies" / "site-export.toml"
    assert f'policy = "{policy}"' in study.site_configs["hospital-1"].read_text()
    policy.write_text(policy.read_text() + "\n# the privacy office changed the policy after this export\n")
    with pytest.raises(ContentBlockedException, match="not exported under the site's export policy"):
        _filter(study, "hospital-1").process(FLModelUtils.to_shareable(FLModel(params=mine.params, meta={"status": "bundle"})), FLContext())


def test_filter_passes_only_what_it_checked(tmp_path, monkeypatch):
    """Extra meta a client script adds (here: a label histogram) is dropped; the header fields are re-read."""
    study = make_study(tmp_path, monkeypatch)
    task = FLModel(params={}, meta={REQUEST_META: {"request-id": "req4"}})
    reply = answer(task, "hospital-1")
    reply.meta["leak"] = [3, 1, 4, 1, 5]
    reply.meta["policy_id"] = "forged"
    out = FLModelUtils.from_shareable(_filter(study, "hospital-1").process(FLModelUtils.to_shareable(reply), FLContext()))
    assert "leak" not in out.meta and out.meta["policy_id"] == "demo/site-export"
    assert set(out.params) == {BUNDLE_PARAM}
    refusal = FLModel(params={}, meta={"status": "refused", "reason": "x\ny", "extra": "dropped"})
    out = FLModelUtils.from_shareable(_filter(study, "hospital-1").process(FLModelUtils.to_shareable(refusal), FLContext()))
    assert out.meta == {"status": "refused", "reason": "x y"}


def test_task_cannot_steer_the_export(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    task = FLModel(params={"policy": np.zeros(1, dtype=np.uint8)},
                   meta={REQUEST_META: {"request-id": "req5", "policy": "/tmp/lax.toml", "recipients": ["attacker"]}})
    reply = answer(task, "hospital-1")
    assert reply.meta["status"] == "bundle"
    ignored = [e for e in study.audit_events("hospital-1") if e.action == "nvflare-request"]
    assert len(ignored) == 1 and set(ignored[0].details["ignored_fields"]) == {"policy", "recipients", "record:param:policy"}
    assert reply.meta["recipients"] == [study.ids["server"].key_id]   # the site's recipients, not the task's


def test_site_without_settings_refuses_with_one_line(tmp_path, monkeypatch):
    study = make_study(tmp_path, monkeypatch)
    monkeypatch.delenv(SITES_DIR_ENV)
    reply = answer(FLModel(params={}, meta={REQUEST_META: {"request-id": "req6"}}), "hospital-1")
    assert reply.params == {} and reply.meta["status"] == "refused"
    assert reply.meta["reason"].startswith("ConfigError: this NVFlare client has no SECURE_ONESHOT_NVFLARE_SITE")
    assert study.root.exists()


def test_job_definition_asks_for_the_site_privacy_scope(tmp_path):
    from secure_oneshot.integrations.nvflare.job import PRIVACY_SCOPE, make_job

    make_job(str(tmp_path / "server.toml"), 3).export_job(str(tmp_path / "jobs"))
    job = tmp_path / "jobs" / "secure-oneshot-transfer"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["scope"] == PRIVACY_SCOPE and meta["min_clients"] == 3
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"].endswith("controller.BundleController")
    assert not (job / "app" / "custom" / "secure_oneshot").exists()   # the installed package is used, not a copy


def test_core_never_imports_nvflare():
    probe = ("import sys\nfrom secure_oneshot.cli import main\n"
             "import secure_oneshot.integrations.nvflare.site, secure_oneshot.integrations.nvflare.server\n"
             "import secure_oneshot.integrations.nvflare.result_check, secure_oneshot.integrations.site_export\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('NVFLARE' if any(m.split('.')[0] == 'nvflare' for m in sys.modules) else 'CLEAN')")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "CLEAN", done.stderr


@pytest.mark.slow
def test_nvflare_simulator_round(tmp_path, monkeypatch):
    """NVFlare's own simulator: the exported job (client script, controller, ingest), 3 sites named site-1..3, site-2's
    policy refuses.  About a minute, most of it the simulator's start and end.  The site's local/privacy.json is
    copied to every simulated site, but NVFlare 2.9's simulator did not run its result filter at the clients (a
    filter configured to block everything let every result through), so the filter is tested above with NVFlare's
    own objects, and here only its pass-through at the server (where the simulator also installs it)."""
    from secure_oneshot.integrations.nvflare.job import make_job

    names = ["site-1", "site-2", "site-3"]
    monkeypatch.setattr(sys.modules[__name__], "NAMES", names)
    study = make_study(tmp_path, monkeypatch, refusing="site-2")
    make_job(str(study.server_config), 3).export_job(str(tmp_path / "jobs"))
    workspace = tmp_path / "ws"
    (workspace / "local").mkdir(parents=True)
    privacy = json.loads((Path(__file__).resolve().parents[1] / "examples" / "nvflare" / "privacy.json").read_text())
    privacy["scopes"][0]["task_result_filters"][0]["args"] = {}   # each site's settings from SECURE_ONESHOT_NVFLARE_SITES
    privacy["scopes"][0]["task_result_filters"][0].pop("direction")  # default: out at a client, in at the server
    (workspace / "local" / "privacy.json").write_text(json.dumps(privacy))
    done = subprocess.run(["nvflare", "simulator", str(tmp_path / "jobs" / "secure-oneshot-transfer"), "-w", str(workspace),
                           "-n", "3", "-t", "3"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "server" / REPORT_NAME).read_text())
    assert saved["counts"] == {"accepted": 2, "refused": 1}, saved
    refused = [r for r in saved["results"] if r["status"] == "refused"]
    assert refused[0]["site"] == "site-2" and refused[0]["reason"].startswith("PolicyViolationError: export refused by policy")
    assert all(r["request_id_bound"] for r in saved["results"] if r["status"] == "delivered")
    assert "Traceback" not in done.stdout + done.stderr

"""The export gate, attacked: free text in the model record, renamed BatchNorm buffers, tensors that do not fit the
declared architecture, a bundle sealed by hand with the site key, and an audit append that fails mid-export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from secure_oneshot import audit
from secure_oneshot.bundle import open_bundle, seal_tensors
from secure_oneshot.client.export import export_model
from secure_oneshot.errors import ConfigError, PolicyViolationError
from secure_oneshot.keys import TrustEntry
from secure_oneshot.policy.dp import DpRecord
from secure_oneshot.policy.load import policy_from_text
from secure_oneshot.policy.site_policy import check_site_policy

from .conftest import NOW
from .model_helpers import make_real_model_dir
from .policy_helpers import POLICIES, dp_record, load_cast
from .test_export import install_policy, request

CAST = load_cast()


def research(tmp_path: Path) -> Path:
    """The most permissive example policy (every artifact allowed): only structure and metadata can say no."""
    return install_policy(tmp_path, "research-study.toml", signers=(CAST.dpo,))


def refused(req, fragment: str) -> list[dict]:
    with pytest.raises(PolicyViolationError) as caught:
        export_model(req)
    denied = [d for d in caught.value.data["evaluation"]["decisions"] if not d["allowed"]]
    assert any(fragment in f"{d['subject']} {d['rule']} {d['reason']}" for d in denied), denied
    assert not req.out.exists()
    assert [p for p in req.out.parent.iterdir() if p.name.endswith(".tmp")] == []
    return denied


# --- 5. only reviewed metadata leaves ----------------------------------------------------------------


@pytest.mark.parametrize("meta, field", [
    ({"data_path": "/data/patients/jane-doe-1972.npz"}, "artifacts.classifier.data_path"),
    ({"architecture": "small-cnn Jane Doe MRN 0042"}, "artifacts.classifier.architecture"),
    ({"num_classes": 10**9}, "artifacts.classifier.num_classes"),
    ({"norm": {"patient": "Jane"}}, "artifacts.classifier.norm"),
])
def test_free_text_in_classifier_metadata_is_refused_naming_the_field(tmp_path: Path, meta, field) -> None:
    model = make_real_model_dir(tmp_path / "m", classifier_meta=meta)
    refused(request(tmp_path, model, research(tmp_path)), field)


def test_unknown_metadata_section_and_nested_key_are_refused(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", generator=True, generator_meta={"notes": "scanned at ward 4"})
    record = json.loads((model / "record.json").read_text())
    record["artifacts"]["generator"]["config"]["comment"] = "from /mnt/pacs/export"
    record["artifacts"]["patients"] = {"n": 12}
    (model / "record.json").write_text(json.dumps(record))
    denied = refused(request(tmp_path, model, research(tmp_path)), "artifacts.generator.notes")
    subjects = {d["subject"] for d in denied}
    assert {"artifacts.generator.config.comment", "artifacts.patients"} <= subjects


def test_unsafe_site_name_is_refused(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", site="St Mary's\nward 4")
    refused(request(tmp_path, model, research(tmp_path)), "site")


def test_only_allow_listed_metadata_reaches_the_manifest(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", generator=True, feature_stats=True)
    report = export_model(request(tmp_path, model, research(tmp_path)))
    meta = open_bundle(report.bundle.path, CAST.server, CAST.server_trust(), now=NOW).manifest.meta
    assert set(meta) == {"policy_version", "site", "artifacts", "recomputed_epsilon", "site_policy", "privacy_statement"}
    assert set(meta["artifacts"]["generator"]) == {"architecture", "config"}  # training recipe, loss, schedule stay
    assert set(meta["artifacts"]["classifier"]) == {"architecture", "in_channels", "num_classes", "norm", "image_size"}
    outcomes = {f.path: f.outcome for f in report.evaluation.metadata.fields}
    assert outcomes["artifacts.generator.final_loss"] == outcomes["artifacts.generator.training"] == "keep"


def test_oversized_record_is_refused_before_parsing(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m")
    record = json.loads((model / "record.json").read_text())
    record["training"]["log"] = "x" * (1 << 20)
    (model / "record.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        export_model(request(tmp_path, model, research(tmp_path)))


# --- 6. artifacts by structure ---------------------------------------------------------------------


def rename(model: Path, old: str, new: str) -> None:
    tensors = load_file(model / "classifier.safetensors")
    tensors[new] = tensors.pop(old)
    save_file(tensors, model / "classifier.safetensors")


@pytest.mark.parametrize("disguise", [" ", "\u200b", "_", ".copy"])
def test_renamed_batchnorm_buffer_is_unknown_and_refused(tmp_path: Path, disguise: str) -> None:
    """Under the strict policy BN statistics may not leave; a renamed buffer must not slip out as 'classifier'."""
    model = make_real_model_dir(tmp_path / "m", dp={"classifier": dp_record()})
    for suffix in ("running_mean", "running_var", "num_batches_tracked"):
        rename(model, f"features.1.{suffix}", f"features.1.{suffix}{disguise}")
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso))
    denied = refused(request(tmp_path, model, policy, without=frozenset({"bn_statistics"})), "defines no such tensor")
    assert f"classifier/features.1.running_mean{disguise}" in {d["subject"] for d in denied}


def test_other_case_of_a_parameter_is_unknown(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m")
    rename(model, "head.weight", "HEAD.weight")
    denied = refused(request(tmp_path, model, research(tmp_path)), "classifier/HEAD.weight")
    assert any("missing" in d["reason"] and d["subject"] == "classifier/head.weight" for d in denied)


def test_shape_and_dtype_mismatches_are_refused(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m")
    tensors = load_file(model / "classifier.safetensors")
    tensors["head.weight"] = torch.zeros(2, 129)
    tensors["head.bias"] = tensors["head.bias"].double()
    save_file(tensors, model / "classifier.safetensors")
    denied = refused(request(tmp_path, model, research(tmp_path)), "shape [2, 129]")
    assert any("dtype F64 where the declared architecture defines F32" in d["reason"] for d in denied)


def test_batchnorm_statistics_found_structurally_and_withheld_whole(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso))
    report = export_model(request(tmp_path, model, policy, without=frozenset({"bn_statistics"})))
    assert not any(n.endswith(("running_mean", "running_var", "num_batches_tracked")) for n in report.tensors)
    assert "classifier/features.1.weight" in report.tensors


def test_feature_statistics_of_an_undeclared_layer_are_refused(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", feature_stats=True)
    stats = load_file(model / "feature_stats.safetensors")
    stats["features.0.mean"] = torch.zeros(32)  # a conv layer: not a normalisation layer the statistics describe
    save_file(stats, model / "feature_stats.safetensors")
    refused(request(tmp_path, model, research(tmp_path)), "feature_stats/features.0.mean")


def test_generator_metadata_that_does_not_build_is_refused(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m", generator=True)
    record = json.loads((model / "record.json").read_text())
    record["artifacts"]["generator"]["config"]["block_out_channels"] = [16]  # the weights are of an 8-channel UNet
    (model / "record.json").write_text(json.dumps(record))
    refused(request(tmp_path, model, research(tmp_path)), "where the declared architecture defines")


# --- 8. bundle and audit record are one act ------------------------------------------------------------


def test_failed_audit_append_leaves_no_bundle_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    model = make_real_model_dir(tmp_path / "m")
    req = request(tmp_path, model, research(tmp_path))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit, "append_event", broken)
    with pytest.raises(OSError):
        export_model(req)
    assert not req.out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_successful_export_leaves_only_the_bundle(tmp_path: Path) -> None:
    model = make_real_model_dir(tmp_path / "m")
    req = request(tmp_path, model, research(tmp_path))
    report = export_model(req)
    assert report.bundle.path == req.out and req.out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert audit.verify_log(req.audit_log, CAST.site.public)[-1].event.bundle_id == report.bundle.manifest.bundle_id


# --- 7. the server re-checks the site policy the bundle carries -------------------------------------------


def ingest_policy(require: bool = True, min_approvals: int = 1):
    text = (POLICIES / "server-ingest.toml").read_text()
    text = text.replace("require_site_policy = false", f"require_site_policy = {str(require).lower()}")
    text = text.replace("min_site_policy_approvals = 1", f"min_site_policy_approvals = {min_approvals}")
    return policy_from_text(text)


def server_trust(*approvers):
    store = CAST.server_trust()
    for who in approvers:
        store = store.with_entry(TrustEntry(who.public, frozenset({"approver"})))
    return store


def opened_export(tmp_path: Path, **model_kwargs):
    model = make_real_model_dir(tmp_path / "m", bn=False, dp={"classifier": dp_record()}, **model_kwargs)
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso))
    report = export_model(request(tmp_path, model, policy))
    return open_bundle(report.bundle.path, CAST.server, CAST.server_trust(), now=NOW), policy


def check(opened, trust, policy=None):
    dp = {a: DpRecord.from_json(r, a) for a, r in opened.manifest.dp.items()}
    return check_site_policy(policy or ingest_policy(), opened.manifest, opened.tensors, dp, trust, NOW)


def test_exported_bundle_passes_the_site_policy_check(tmp_path: Path) -> None:
    opened, _ = opened_export(tmp_path)
    ev = check(opened, server_trust(CAST.dpo, CAST.ciso))
    assert ev is not None and ev.allowed
    assert check(opened, CAST.server_trust(), ingest_policy(require=False)) is None  # not required: not checked


def test_server_needs_approvals_it_trusts(tmp_path: Path) -> None:
    opened, _ = opened_export(tmp_path)
    with pytest.raises(PolicyViolationError, match="only 1 of 2 required approvals valid in this server's trust store"):
        check(opened, server_trust(CAST.dpo))
    with pytest.raises(PolicyViolationError, match="only 0 of 2 required approvals"):
        check(opened, None)


def reseal(tmp_path: Path, opened, *, tensors=None, meta=None, policy_sha256=None, policy_id=None, name="rogue.sob"):
    """What an operator holding only the site key can do: seal anything, with any statements."""
    result = seal_tensors(dict(tensors if tensors is not None else opened.tensors), tmp_path / name, sender=CAST.site,
                          recipients=[CAST.server.public], policy_id=policy_id or opened.manifest.policy_id,
                          policy_sha256=policy_sha256 if policy_sha256 is not None else opened.manifest.policy_sha256,
                          dp=opened.manifest.dp, meta=meta if meta is not None else opened.manifest.meta, now=NOW)
    return open_bundle(result.path, CAST.server, CAST.server_trust(), now=NOW)


def test_hand_sealed_bundle_without_a_site_policy_is_refused(tmp_path: Path) -> None:
    opened, _ = opened_export(tmp_path)
    meta = {k: v for k, v in opened.manifest.meta.items() if k != "site_policy"}
    with pytest.raises(PolicyViolationError, match="bundle carries no site policy"):
        check(reseal(tmp_path, opened, meta=meta), server_trust(CAST.dpo, CAST.ciso))


def test_carried_policy_must_be_the_one_the_manifest_names(tmp_path: Path) -> None:
    opened, _ = opened_export(tmp_path)
    meta = dict(opened.manifest.meta)
    meta["site_policy"] = {**meta["site_policy"], "toml": meta["site_policy"]["toml"].replace("valid_days = 7", "valid_days = 8")}
    with pytest.raises(PolicyViolationError, match="site policy hash differs from the signed manifest"):
        check(reseal(tmp_path, opened, meta=meta), server_trust(CAST.dpo, CAST.ciso))


def test_rogue_operator_policy_without_trusted_approval_is_refused(tmp_path: Path) -> None:
    """The operator writes a permissive policy of their own (0 approvals required) and points the manifest at it."""
    opened, _ = opened_export(tmp_path)
    text = (POLICIES / "research-study.toml").read_text().replace("required = 1", "required = 0")
    rogue = policy_from_text(text)
    meta = {**opened.manifest.meta, "site_policy": {"toml": text, "approvals": []}}
    with pytest.raises(PolicyViolationError, match="only 0 of 1 required approvals valid in this server's trust store"):
        check(reseal(tmp_path, opened, meta=meta, policy_sha256=rogue.sha256, policy_id=rogue.id), server_trust(CAST.dpo, CAST.ciso))


def test_tensors_the_approved_policy_denies_are_refused_at_the_server(tmp_path: Path) -> None:
    """The approved strict policy travels along, but the operator adds the BatchNorm statistics it denies."""
    opened, _ = opened_export(tmp_path)
    bn_model = make_real_model_dir(tmp_path / "bn", bn=True)
    bn = {f"classifier/{k}": v for k, v in load_file(bn_model / "classifier.safetensors").items()}
    meta = json.loads(json.dumps(opened.manifest.meta))
    meta["artifacts"]["classifier"]["norm"] = "batch"
    with pytest.raises(PolicyViolationError, match="not allowed by the site's own policy") as caught:
        check(reseal(tmp_path, opened, tensors=bn, meta=meta), server_trust(CAST.dpo, CAST.ciso))
    denied = {d["subject"] for d in caught.value.data["decisions"] if not d["allowed"]}
    assert "classifier/features.1.running_mean" in denied


def test_received_tensors_are_classified_by_structure_at_ingest(tmp_path: Path) -> None:
    from secure_oneshot.policy.evaluate import evaluate_ingest

    opened, _ = opened_export(tmp_path)
    tensors = dict(opened.tensors)
    tensors["classifier/features.1.running_mean "] = torch.zeros(32)
    ev = evaluate_ingest(ingest_policy(require=False), CAST.site.key_id, tensors, {}, opened.manifest.meta, 1000)
    assert any(d.subject == "classifier/features.1.running_mean " and not d.allowed for d in ev.decisions)
    meta = json.loads(json.dumps(opened.manifest.meta))
    meta["artifacts"]["classifier"]["training"] = {"seed": 1}
    ev = evaluate_ingest(ingest_policy(require=False), CAST.site.key_id, dict(opened.tensors), {}, meta, 1000)
    assert [d.subject for d in ev.denied] == ["artifacts.classifier.training"]


def test_ingest_with_require_site_policy_accepts_the_export_and_quarantines_the_hand_sealed(tmp_path: Path) -> None:
    from secure_oneshot.server.ingest import IngestFolders, ingest_inbox

    opened, _ = opened_export(tmp_path)
    inbox = tmp_path / "server" / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "a-exported.sob").write_bytes((tmp_path / "out.sob").read_bytes())
    meta = {k: v for k, v in opened.manifest.meta.items() if k != "site_policy"}
    seal_tensors(dict(opened.tensors), inbox / "b-hand-sealed.sob", sender=CAST.site, recipients=[CAST.server.public],
                 policy_id=opened.manifest.policy_id, policy_sha256=opened.manifest.policy_sha256, dp=opened.manifest.dp,
                 meta=meta, now=NOW)
    folders = IngestFolders.under(tmp_path / "server")
    outcomes = ingest_inbox(folders, CAST.server, server_trust(CAST.dpo, CAST.ciso), ingest_policy(), NOW)
    got = {o.file: (o.outcome, o.reason) for o in outcomes}
    assert got["a-exported.sob"][0] == "accepted"
    assert got["b-hand-sealed.sob"][0] == "quarantined" and "bundle carries no site policy" in got["b-hand-sealed.sob"][1]

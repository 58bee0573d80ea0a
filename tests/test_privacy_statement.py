"""The privacy statement every export signs: schema, agreement with the DP records, composition over earlier
releases, policy requirements, and ingest's check of a statement that disagrees with its own bundle."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from secure_oneshot.bundle import open_bundle
from secure_oneshot.client import export as export_module
from secure_oneshot.client.export import export_model
from secure_oneshot.errors import ConfigError, PrivacyError
from secure_oneshot.policy.dp import compute_epsilon
from secure_oneshot.policy.privacy_statement import (
    SCHEMA_FIELDS,
    check_statement,
    group_privacy,
    parse_statement,
    public_summary,
)

from .conftest import NOW
from .ingest_helpers import reasons, run_ingest
from .policy_helpers import dp_record, load_cast
from .test_export import install_policy, request, strict_setup

CAST = load_cast()
RULES = "[bundle]"


def with_rules(text: str) -> dict[str, str]:
    """An edit for install_policy: a [privacy_statement] table just before [bundle]."""
    return {RULES: f"[privacy_statement]\n{text}\n\n{RULES}"}


def exported(tmp_path: Path, edit: dict[str, str] | None = None, out: str = "out.sob", now: datetime = NOW, **model_kwargs):
    model, _ = strict_setup(tmp_path, **model_kwargs)
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit=edit, filename="p.toml",
                            expires=now + timedelta(days=180))
    report = export_model(request(tmp_path, model, policy, out=tmp_path / out, now=now))
    return model, policy, report


def manifest_of(path: Path):
    return open_bundle(path, CAST.server, CAST.server_trust(), now=NOW).manifest


def test_every_export_signs_a_valid_statement_that_agrees_with_its_dp_record(tmp_path: Path) -> None:
    _, _, report = exported(tmp_path)
    manifest = manifest_of(report.bundle.path)
    statement = parse_statement(manifest.meta["privacy_statement"])
    assert statement == report.statement
    entry, record = statement["dp"]["classifier"], manifest.dp["classifier"]
    recomputed = compute_epsilon("rdp", [(1.1, 0.01, 1000)], 1e-5)
    assert float(entry["epsilon"]) == pytest.approx(recomputed, rel=1e-9)
    assert (entry["delta"], entry["accountant"], entry["sampling"]) == (record["delta"], record["accountant"], record["sampling"])
    assert entry["history"] == record["history"] and entry["steps"] == 1000 and float(entry["epochs"]) == pytest.approx(10.0)
    assert entry["poisson"] is True
    released = {a["artifact"]: a for a in statement["released"]["artifacts"]}
    assert released["classifier"]["dp"] is True
    assert released["classifier"]["tensors"] == statement["released"]["tensors"] == len(report.tensors)
    p = statement["provenance"]
    assert (p["policy_id"], p["policy_sha256"], p["exported"], p["expires"]) == (
        manifest.policy_id, manifest.policy_sha256, manifest.created, manifest.expires)
    assert p["data_fingerprint"] == record["dataset_fingerprint"]
    # no patient-level guarantee without a declared bound; N withheld by default
    unit = statement["unit_of_privacy"]
    assert unit["patient_level"]["epsilon"] is None and "NO patient-level guarantee" in unit["statement"]
    assert entry["delta_times_n"] is None
    assert statement["utility"]["shared"] is False
    assert check_statement(statement, manifest=manifest.to_json(), tensor_artifacts={n: "classifier" for n in report.tensors},
                           tensor_bytes=_bytes(report), dp={"classifier": dp_record()}, epsilons={"classifier": recomputed},
                           composed={}) == []


def _bytes(report) -> dict[str, int]:
    sizes = {a["artifact"]: a["bytes"] for a in report.statement["released"]["artifacts"]}
    per = sizes["classifier"] // len(report.tensors)
    names = sorted(report.tensors)
    out = {n: per for n in names}
    out[names[0]] += sizes["classifier"] - per * len(names)
    return out


def _paths(spec, prefix: str = ""):
    """Every required field path of the schema (objects only; lists and maps are checked through their entries)."""
    for key, kind in spec.items():
        path = f"{prefix}.{key}" if prefix else key
        yield path
        if isinstance(kind, dict):
            yield from _paths(kind, path)


@pytest.fixture(scope="module")
def statement(tmp_path_factory) -> dict:
    _, _, report = exported(tmp_path_factory.mktemp("statement"))
    return report.statement


@pytest.mark.parametrize("path", list(_paths(SCHEMA_FIELDS)))
def test_each_required_field_missing_is_a_specific_error(statement: dict, path: str) -> None:
    broken = copy.deepcopy(statement)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    del node[last]
    with pytest.raises(PrivacyError, match=rf"privacy statement: {'schema' if path == 'schema' else path.replace('.', '[.]')}: "):
        parse_statement(broken)


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.__setitem__("extra", 1), "extra: unknown field"),
    (lambda s: s["dp"]["classifier"].__setitem__("epsilon", 1.0), "dp.classifier.epsilon: floats are not allowed"),
    (lambda s: s["dp"]["classifier"].__setitem__("epsilon", "1.00"), "not a canonical decimal"),
    (lambda s: s["released"].__setitem__("tensors", -1), "released.tensors: must be a non-negative integer"),
    (lambda s: s.__setitem__("schema", "secure-oneshot/privacy-statement/v9"), "schema: must be"),
    (lambda s: s["provenance"].__setitem__("code_version", "x" * 70_000), "over the 65536-byte limit"),
    (lambda s: s["provenance"].__setitem__("training_versions", {"a": {"b": {"c": {"d": {"e": {"f": {}}}}}}}), "nested deeper"),
])
def test_unknown_wrong_oversized_and_deep_fields_are_refused(statement: dict, mutate, message: str) -> None:
    broken = copy.deepcopy(statement)
    mutate(broken)
    with pytest.raises(PrivacyError, match=message):
        parse_statement(broken)


def test_composed_epsilon_over_two_exports_of_the_same_data_increases(tmp_path: Path) -> None:
    model, policy, first = exported(tmp_path)
    second = export_model(request(tmp_path, model, policy, out=tmp_path / "second.sob"))
    one = first.statement["composed"]["with_earlier_releases"][0]
    two = second.statement["composed"]["with_earlier_releases"][0]
    assert (one["releases"], two["releases"]) == (0, 1)
    assert two["bundle_ids"] == [first.bundle.manifest.bundle_id]
    assert float(two["epsilon"]) > float(one["epsilon"]) * 1.2
    assert float(two["epsilon"]) == pytest.approx(compute_epsilon("rdp", [(1.1, 0.01, 2000)], 2e-5), rel=1e-9)
    assert two["delta"] == "2e-05"


def test_patient_level_epsilon_by_group_privacy_when_the_policy_declares_k(tmp_path: Path) -> None:
    _, _, report = exported(tmp_path, with_rules("max_images_per_patient = 4\nshare_record_count = true"))
    unit = report.statement["unit_of_privacy"]
    eps = float(report.statement["dp"]["classifier"]["epsilon"])
    expected = group_privacy(eps, 1e-5, 4)
    assert float(unit["patient_level"]["epsilon"]) == pytest.approx(4 * eps)
    assert float(unit["patient_level"]["delta"]) == pytest.approx(expected[1])
    assert "k * exp((k - 1) * epsilon) * delta" in unit["patient_level"]["formula"]
    assert "at most 4 images per patient" in unit["statement"]


def test_policy_requires_a_privacy_audit(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError) as caught:
        exported(tmp_path, with_rules("require_privacy_audit = true"))
    denied = [d for d in caught.value.data["evaluation"]["decisions"] if not d["allowed"]]
    assert [d["rule"] for d in denied] == ["privacy_statement.require_privacy_audit"]
    assert not (tmp_path / "out.sob").exists()


def test_privacy_audit_results_enter_the_statement(tmp_path: Path) -> None:
    model, _ = strict_setup(tmp_path)
    report_json = {"attacks": [{"name": "loss threshold", "auc": 0.52, "tpr_at_1pct_fpr": 0.011, "tpr_at_01pct_fpr": 0.0,
                                "epsilon_lower_bound": 0.0, "members": 100, "non_members": 100}], "delta": 1e-5}
    (model / "privacy_audit.json").write_text(json.dumps(report_json))
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit=with_rules("require_privacy_audit = true"),
                            filename="p.toml")
    report = export_model(request(tmp_path, model, policy))
    audit = report.statement["empirical"]["privacy_audit"]
    assert audit["present"] and audit["attacks"][0]["auc"] == "0.52" and len(audit["sha256"]) == 64


def test_a_missing_named_privacy_audit_report_is_a_config_error(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    with pytest.raises(ConfigError, match="privacy audit report .* not found"):
        export_model(request(tmp_path, model, policy, privacy_audit=tmp_path / "nope.json"))


def test_max_composed_epsilon_counts_earlier_releases(tmp_path: Path) -> None:
    model, policy, first = exported(tmp_path)
    eps = float(first.statement["dp"]["classifier"]["epsilon"])
    tight = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso),
                           edit=with_rules(f"max_composed_epsilon = {eps * 1.1:.6f}"), filename="p2.toml")
    with pytest.raises(PrivacyError, match="over this bundle and earlier releases"):
        export_model(request(tmp_path, model, tight, out=tmp_path / "again.sob"))


def _ingest_with_statement_bug(tmp_path: Path, monkeypatch, bug) -> dict:
    real = export_module.build_statement

    def buggy(*args, **kwargs):
        statement = real(*args, **kwargs)
        bug(statement)
        return statement

    monkeypatch.setattr(export_module, "build_statement", buggy)
    root = tmp_path / "server"
    (root / "inbox").mkdir(parents=True)
    exported(tmp_path, out="server/inbox/site.sob")
    folders, outcomes = run_ingest(root)
    assert [o.outcome for o in outcomes] == ["quarantined"]
    assert outcomes[0].error == "PrivacyError"
    return reasons(folders)["site.sob"]


def test_ingest_quarantines_a_statement_claiming_a_smaller_epsilon_than_its_dp_record(tmp_path: Path, monkeypatch) -> None:
    reason = _ingest_with_statement_bug(tmp_path, monkeypatch, lambda s: s["dp"]["classifier"].__setitem__("epsilon", "1.0"))
    assert "privacy statement disagrees with the bundle: dp.classifier.epsilon 1 disagrees" in reason["message"]


def test_ingest_quarantines_a_statement_with_the_wrong_tensor_count(tmp_path: Path, monkeypatch) -> None:
    def bug(s):
        s["released"]["artifacts"][0]["tensors"] -= 1
    reason = _ingest_with_statement_bug(tmp_path, monkeypatch, bug)
    assert "tensor(s) for classifier, the bundle holds" in reason["message"]


def test_ingest_accepts_an_honest_statement(tmp_path: Path) -> None:
    root = tmp_path / "server"
    (root / "inbox").mkdir(parents=True)
    exported(tmp_path, out="server/inbox/site.sob")
    _, outcomes = run_ingest(root)
    assert [o.outcome for o in outcomes] == ["accepted"], outcomes


def test_public_summary_leaves_out_what_gives_the_record_count(statement: dict) -> None:
    summary = json.dumps(public_summary(statement))
    for private in ("sample_rate", "steps", "epochs", "data_fingerprint", "delta_times_n", statement["provenance"]["data_fingerprint"]):
        assert private not in summary


def test_verify_and_inspect_cli_show_the_statement_and_never_the_private_key(tmp_path: Path, capsys) -> None:
    from secure_oneshot.cli import main

    from .ingest_helpers import server_cli_args
    from .policy_helpers import VECTOR_KEYS

    _, _, report = exported(tmp_path, now=datetime.now(timezone.utc))   # the command checks validity by the clock
    assert main(["inspect", str(report.bundle.path)]) == 0
    shown = capsys.readouterr().out
    assert "privacy statement is signed and encrypted inside the bundle" in shown
    assert main(["verify", str(report.bundle.path), *server_cli_args(tmp_path), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["privacy_statement"]["dp"]["classifier"]["epsilon"] == report.statement["dp"]["classifier"]["epsilon"]
    assert "data_fingerprint" not in json.dumps(data["privacy_statement"])
    secret = next(line for line in (VECTOR_KEYS / "server.key").read_text().splitlines() if line.startswith("secret"))
    assert secret.split("=", 1)[1].strip().strip('"') not in out
    assert main(["verify", str(report.bundle.path), *server_cli_args(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "privacy statement (signed by the site):" in text and "NO patient-level guarantee" in text


def test_ingest_outcome_carries_the_statement_summary(tmp_path: Path) -> None:
    root = tmp_path / "server"
    (root / "inbox").mkdir(parents=True)
    exported(tmp_path, out="server/inbox/site.sob")
    _, outcomes = run_ingest(root)
    eps = float(outcomes[0].privacy_summary.split("classifier eps ")[1].split(";")[0])
    assert eps == pytest.approx(compute_epsilon("rdp", [(1.1, 0.01, 1000)], 1e-5), rel=1e-2)


def test_distill_report_states_each_sites_guarantee_and_the_post_processing_position(statement: dict) -> None:
    from secure_oneshot.server.privacy_position import POST_PROCESSING, position_markdown, privacy_position

    position = privacy_position([("hospital-1", "b1", statement), ("hospital-2", "b2", None)])
    first, second = position["sites"]
    assert position["global_model"] == POST_PROCESSING
    assert first["worst_epsilon"] == pytest.approx(float(statement["dp"]["classifier"]["epsilon"]))
    assert first["statement"] == public_summary(statement) and first["dp"] is True
    assert second["statement"] is None and position["sites_without_dp"] == ["hospital-2"]
    text = "\n".join(position_markdown(position))
    assert "## Privacy position" in text and "- hospital-2: no privacy statement" in text
    assert "data_fingerprint" not in json.dumps(position)
    nothing = privacy_position([("hospital-2", "b2", None)])
    assert "nothing is claimed" in nothing["global_model"]


def test_the_server_loads_each_accepted_bundles_statement(tmp_path: Path) -> None:
    from secure_oneshot.server.study import load_accepted

    root = tmp_path / "server"
    (root / "inbox").mkdir(parents=True)
    _, _, report = exported(tmp_path, out="server/inbox/site.sob")
    folders, outcomes = run_ingest(root)
    assert [o.outcome for o in outcomes] == ["accepted"]
    (site,) = load_accepted(folders, CAST.server, CAST.server_trust(), now=NOW)
    assert site.privacy_statement == report.statement

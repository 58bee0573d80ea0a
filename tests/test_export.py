"""``export``: every refusal path writes an audit record and no bundle; a permitted export binds the policy."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from secure_oneshot import audit
from secure_oneshot.bundle import open_bundle
from secure_oneshot.client.export import ExportRequest, export_model
from secure_oneshot.errors import AuditLogError, PolicyViolationError, PrivacyError
from secure_oneshot.policy.signatures import sign_policy
from secure_oneshot.policy.load import load_export_policy

from .conftest import NOW
from .model_helpers import make_real_model_dir as make_model_dir
from .policy_helpers import POLICIES, dp_record, example_policy, load_cast

CAST = load_cast()


def install_policy(tmp_path: Path, name: str, signers=(), edit=None, filename: str | None = None,
                   expires: datetime | None = None) -> Path:
    """Copy a policy from policies/ (optionally edited) and have ``signers`` sign it.

    ``expires`` replaces the example's own expiry: a test that exports by the real clock must not
    fail on the day the example policy is due for review.
    """
    text = (POLICIES / name).read_text() if expires is None else example_policy(name, expires)
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / (filename or name)
    path.write_text(text)
    for who in signers:
        sign_policy(load_export_policy(path), path, who, NOW)
    return path


def request(tmp_path: Path, model: Path, policy: Path, **overrides) -> ExportRequest:
    base = ExportRequest(model_dir=model, policy_path=policy, sender=CAST.site, recipients=[CAST.server.public],
                         out=tmp_path / "out.sob", audit_log=tmp_path / "audit.jsonl", trust=CAST.site_trust(), now=NOW)
    return replace(base, **overrides)


def strict_setup(tmp_path: Path, **model_kwargs) -> tuple[Path, Path]:
    dp = model_kwargs.pop("dp", {"classifier": dp_record()})
    model = make_model_dir(tmp_path / "model", bn=model_kwargs.pop("bn", False), dp=dp, **model_kwargs)
    return model, install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso))


def assert_refused(tmp_path: Path, req: ExportRequest, error: type, fragment: str) -> None:
    with pytest.raises(error) as caught:
        export_model(req)
    denied = [d for d in caught.value.data["evaluation"]["decisions"] if not d["allowed"]]
    assert any(fragment in f"{d['rule']} {d['reason']}" for d in denied), denied  # the right rule said no
    assert not req.out.exists(), "a refused export must not write a bundle"
    last = audit.verify_log(req.audit_log, CAST.site.public)[-1]
    assert (last.event.action, last.event.outcome) == ("export", "refused")
    assert last.event.details["denied"], "the audit record lists the denials"
    assert list(tmp_path.glob("*.tmp")) == [] and list(tmp_path.glob(".*.tmp")) == []


def test_strict_export_succeeds_and_binds_the_policy(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    report = export_model(request(tmp_path, model, policy))
    opened = open_bundle(report.bundle.path, CAST.server, CAST.server_trust(), now=NOW)
    strict = load_export_policy(policy)
    assert opened.header.policy_id == strict.id and opened.manifest.policy_sha256 == strict.sha256
    assert sorted(opened.tensors) == sorted(report.tensors) and all(n.startswith("classifier/") for n in opened.tensors)
    assert "classifier" in opened.manifest.dp and opened.manifest.meta["policy_version"] == 1
    assert opened.header.expires == "2026-12-03T12:00:00Z"  # valid_days = 7
    last = audit.verify_log(tmp_path / "audit.jsonl", CAST.site.public)[-1]
    assert (last.event.outcome, last.event.bundle_id) == ("ok", opened.header.bundle_id)
    assert last.event.payload_sha256 == opened.manifest.payload_sha256


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    report = export_model(request(tmp_path, model, policy, dry_run=True))
    assert report.bundle is None and report.tensors and not (tmp_path / "out.sob").exists()
    assert not (tmp_path / "audit.jsonl").exists()


def test_refused_recipient_not_allowed(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    req = request(tmp_path, model, policy, recipients=[CAST.server.public, CAST.outsider.public])
    assert_refused(tmp_path, req, PolicyViolationError, "not in recipients.allowed")


def test_refused_batchnorm_statistics(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path, bn=True)
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "bn_statistics")
    # Leaving them out explicitly is the way forward, and works.
    assert export_model(request(tmp_path, model, policy, without=frozenset({"bn_statistics"}))).bundle is not None


def test_refused_generator_without_dp(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path, generator=True)
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "no DP record")


def test_refused_epsilon_too_high(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path, dp={"classifier": dp_record(noise=0.6, steps=3000)})
    assert_refused(tmp_path, request(tmp_path, model, policy), PrivacyError, "dp.classifier.max_epsilon")


def test_refused_delta_too_high(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path, dp={"classifier": dp_record(delta=1e-3)})
    assert_refused(tmp_path, request(tmp_path, model, policy), PrivacyError, "dp.classifier.max_delta")


def test_refused_non_poisson_sampling(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path, dp={"classifier": dp_record(sampling="shuffle")})
    assert_refused(tmp_path, request(tmp_path, model, policy), PrivacyError, "Poisson sampling required")


def test_refused_forged_dp_claim(tmp_path: Path) -> None:
    honest = dp_record()
    forged = dp_record(claim=honest.epsilon / 2)
    model, policy = strict_setup(tmp_path, dp={"classifier": forged})
    assert_refused(tmp_path, request(tmp_path, model, policy), PrivacyError, "forged")


def test_refused_composed_budget(tmp_path: Path) -> None:
    """Classifier and generator on the same records: each within 8, together over 10."""
    records = {"classifier": dp_record(noise=0.7, steps=2500), "generator": dp_record(noise=0.7, steps=2500)}  # 7.8 each, 10.4 composed
    assert all(7 < r.epsilon < 8 for r in records.values()), [r.epsilon for r in records.values()]
    model, policy = strict_setup(tmp_path, generator=True, dp=records)
    assert_refused(tmp_path, request(tmp_path, model, policy), PrivacyError, "dp.composed.max_epsilon")


def test_composed_delta_at_the_limit_is_allowed(tmp_path: Path) -> None:
    """Three records of delta 1e-5 sum to 3.0000000000000004e-05 in floating point; the 3e-5 limit must hold."""
    records = {a: dp_record(noise=3.0, steps=200) for a in ("classifier", "generator", "dp_feature_statistics")}
    records["dp_feature_statistics"] = dp_record(noise=3.0, rate=1.0, steps=1, sampling="fixed")
    model = make_model_dir(tmp_path / "model", bn=False, generator=True, feature_stats=True, dp=records)
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso),
                            edit={"max_delta = 4e-5": "max_delta = 3e-5"})   # exactly three releases' worth
    report = export_model(request(tmp_path, model, policy, dry_run=True))
    assert any(n.startswith("generator/") for n in report.tensors)


def test_refused_unknown_tensor(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso),
                            edit={'names = ["classifier/*"]': 'names = ["classifier/head.*"]'})
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "no [[tensors]] rule allows it")


def test_refused_tensor_too_large(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit={"max_bytes = 50_000_000": "max_bytes = 64"})
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "bytes > max_bytes 64")


def test_refused_bundle_too_large(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit={"max_bytes = 150_000_000": "max_bytes = 100"})
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "bundle.max_bytes")


def test_refused_expired_policy(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    assert_refused(tmp_path, request(tmp_path, model, policy, now=NOW + timedelta(days=200)), PolicyViolationError, "expires")


def test_refused_too_few_approvals(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo,))
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "1 valid approver signature(s), 2 required")


def test_site_floor_refuses_an_unsigned_policy(tmp_path: Path) -> None:
    """A policy that asks for no signatures is still refused where the site requires them."""
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    policy = install_policy(tmp_path, "hospital-strict.toml", edit={"required = 2": "required = 0"})
    assert export_model(request(tmp_path, model, policy, dry_run=True)).tensors
    assert_refused(tmp_path, request(tmp_path, model, policy, min_approvals=1), PolicyViolationError, "the site requires at least 1")


def test_signature_of_an_edited_policy_does_not_count(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    policy.write_text(policy.read_text().replace("valid_days = 7", "valid_days = 8"))
    assert_refused(tmp_path, request(tmp_path, model, policy), PolicyViolationError, "0 valid approver signature(s)")


def test_refused_policy_rollback(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=False, dp={"classifier": dp_record()})
    v2 = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), edit={"version = 1": "version = 2"}, filename="v2.toml")
    v1 = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo, CAST.ciso), filename="v1.toml")
    export_model(request(tmp_path, model, v2))
    assert_refused(tmp_path, request(tmp_path, model, v1, out=tmp_path / "old.sob"), PolicyViolationError, "version 2 was already used")


def test_tampered_audit_log_blocks_export(tmp_path: Path) -> None:
    model, policy = strict_setup(tmp_path)
    export_model(request(tmp_path, model, policy))
    log = tmp_path / "audit.jsonl"
    log.write_text(log.read_text().replace('"outcome":"ok"', '"outcome":"refused"'))
    with pytest.raises(AuditLogError):
        export_model(request(tmp_path, model, policy, out=tmp_path / "again.sob"))
    assert not (tmp_path / "again.sob").exists()


def test_all_violations_are_reported_together(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model", bn=True, generator=True, dp={"classifier": dp_record(delta=1e-3)})
    policy = install_policy(tmp_path, "hospital-strict.toml", signers=(CAST.dpo,))
    with pytest.raises(PrivacyError) as caught:
        export_model(request(tmp_path, model, policy, recipients=[CAST.outsider.public]))
    denied = {(d["rule"]) for d in caught.value.data["evaluation"]["decisions"] if not d["allowed"]}
    assert {"approval.required", "recipients.allowed", "artifacts.bn_statistics", "artifacts.generator", "dp.classifier.max_delta"} <= denied

"""``ingest``: a mixed inbox -> exactly the good bundles accepted, the rest quarantined with reasons; idempotent."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from secure_oneshot import audit
from secure_oneshot.bundle import open_bundle, seal_tensors
from secure_oneshot.policy.load import load_ingest_policy
from secure_oneshot.server.ingest import IngestFolders, ingest_inbox

from .conftest import NOW
from .ingest_helpers import CAST, CLASSIFIER_META, small_cnn_tensors
from .policy_helpers import POLICIES, dp_record
META = CLASSIFIER_META


def seal(path: Path, *, sender=None, named=None, meta=META, dp=None) -> Path:
    named = named or small_cnn_tensors()
    seal_tensors(named, path, sender=sender or CAST.site, recipients=[CAST.server.public], meta=meta,
                 dp={a: r.to_json() for a, r in (dp or {}).items()}, now=NOW)
    return path


def build_inbox(root: Path) -> dict[str, str]:
    """file name -> expected outcome ('accepted' or the error class)."""
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    seal(inbox / "a-good.sob")
    seal(inbox / "b-good-dp.sob", dp={"classifier": dp_record()})
    tampered = bytearray(seal(inbox / "c-tampered.sob").read_bytes())
    tampered[-10] ^= 1
    (inbox / "c-tampered.sob").write_bytes(bytes(tampered))
    shutil.copy(inbox / "a-good.sob", inbox / "d-replayed.sob")  # same bundle id, arrives again
    seal(inbox / "e-untrusted.sob", sender=CAST.outsider)
    seal(inbox / "f-wrong-arch.sob", meta={"artifacts": {"classifier": {**CLASSIFIER_META["artifacts"]["classifier"], "architecture": "vit-huge"}}})
    seal(inbox / "g-forged-dp.sob", dp={"classifier": dp_record(claim=0.5)})
    seal(inbox / "h-no-classifier.sob", named={"generator/unet.w": torch.ones(1)}, meta={"artifacts": {"generator": {"architecture": "unet2d-small"}}})
    (inbox / "i-garbage.sob").write_bytes(b"not a bundle at all")
    return {
        "a-good.sob": "accepted", "b-good-dp.sob": "accepted", "c-tampered.sob": "BundleAuthError",
        "d-replayed.sob": "ReplayError", "e-untrusted.sob": "TrustError", "f-wrong-arch.sob": "PolicyViolationError",
        "g-forged-dp.sob": "PrivacyError", "h-no-classifier.sob": "PolicyViolationError", "i-garbage.sob": "BundleFormatError",
    }


def run(root: Path):
    folders = IngestFolders.under(root)
    return folders, ingest_inbox(folders, CAST.server, CAST.server_trust(), load_ingest_policy(POLICIES / "server-ingest.toml"), NOW)


def reasons(folders: IngestFolders) -> dict[str, dict]:
    """Quarantine reason files by the original inbox name they record (quarantined files get generated names)."""
    found = [json.loads(p.read_text()) for p in folders.quarantine.glob("*.reason.json")]
    by_name = {r["file"]: r for r in found}
    assert len(by_name) == len(found)
    return by_name


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def test_mixed_inbox(tmp_path: Path) -> None:
    expected = build_inbox(tmp_path)
    delivered = {p.name: p.read_bytes() for p in (tmp_path / "inbox").iterdir()}
    folders, outcomes = run(tmp_path)
    got = {o.file: ("accepted" if o.outcome == "accepted" else o.error) for o in outcomes}
    assert got == expected
    assert list(folders.inbox.iterdir()) == []
    accepted = sorted(p.name for p in folders.accepted.glob("*.sob"))
    assert len(accepted) == 2
    for name in accepted:  # kept encrypted at rest; re-openable with the server key
        opened = open_bundle(folders.accepted / name, CAST.server, CAST.server_trust(), now=NOW)
        entry = json.loads((folders.accepted / name).with_suffix(".json").read_text())
        assert entry["bundle_id"] == opened.header.bundle_id and entry["tensors"] == sorted(opened.tensors)
        assert entry["file_sha256"] == hashlib.sha256((folders.accepted / name).read_bytes()).hexdigest()
        assert entry["ingest_policy"]["sha256"] == load_ingest_policy(POLICIES / "server-ingest.toml").sha256
    by_name = reasons(folders)
    assert sorted(by_name) == sorted(n for n, e in expected.items() if e != "accepted")
    for name, reason in by_name.items():
        assert reason["error"] == expected[name] and reason["message"], name
        assert (tmp_path / reason["stored_as"]).read_bytes() == delivered[name], name  # the refused bytes, kept as evidence
    for path in [*folders.accepted.iterdir(), *folders.quarantine.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for folder in (folders.accepted, folders.quarantine):
        assert folder.stat().st_mode & 0o777 == 0o700
    records = audit.verify_log(folders.audit_log, CAST.server.public)
    assert [r.event.outcome for r in records].count("ok") == 2 and len(records) == len(expected)


def test_quarantine_reasons_name_the_rule(tmp_path: Path) -> None:
    build_inbox(tmp_path)
    folders, _ = run(tmp_path)
    by_name = reasons(folders)
    # an architecture the server cannot even build is refused by the structure rule, before the allow-list
    assert any(d["rule"] == "structure" and not d["allowed"] and "unknown architecture 'vit-huge'" in d["reason"]
               for d in by_name["f-wrong-arch.sob"]["decisions"])
    assert "forged" in by_name["g-forged-dp.sob"]["message"]
    assert "already accepted" in by_name["d-replayed.sob"]["message"]


def test_running_twice_changes_nothing(tmp_path: Path) -> None:
    build_inbox(tmp_path)
    run(tmp_path)
    before = snapshot(tmp_path)
    _, outcomes = run(tmp_path)
    assert outcomes == [] and snapshot(tmp_path) == before


def test_a_bundle_arriving_again_later_is_a_replay(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    original = seal(tmp_path / "inbox" / "x.sob").read_bytes()
    run(tmp_path)
    (tmp_path / "inbox" / "x.sob").write_bytes(original)
    folders, outcomes = run(tmp_path)
    assert [o.error for o in outcomes] == ["ReplayError"]
    assert len(list(folders.accepted.glob("*.sob"))) == 1


def test_a_flood_of_dp_history_is_refused_before_any_accounting(tmp_path: Path, monkeypatch) -> None:
    """A site key can sign any DP claim: 11 records x 1,000 accountant entries must cost no accountant work."""
    from secure_oneshot.policy import dp as dp_module

    entry = {"noise_multiplier": "1.0", "sample_rate": "0.01", "steps": 1}
    flood = {f"artifact{i}": {**dp_record().to_json(), "history": [entry] * 1000} for i in range(11)}
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    seal_tensors(small_cnn_tensors(), inbox / "flood.sob", sender=CAST.site, recipients=[CAST.server.public], meta=META, dp=flood, now=NOW)

    def no_accounting(*args, **kwargs):
        raise AssertionError("the accountant ran on a bundle that exceeds the history cap")

    monkeypatch.setattr(dp_module.DpRecord, "from_json", no_accounting)
    folders, outcomes = run(tmp_path)
    assert [(o.outcome, o.error) for o in outcomes] == [("quarantined", "PrivacyError")]
    assert "history entries" in reasons(folders)["flood.sob"]["message"]

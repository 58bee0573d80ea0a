"""``distill``'s loader uses only what ``ingest`` accepted: registry-listed, same bytes, in the ledger, same bundle id,
and still passing the ingest policy.  Each test plays someone who can write to ``accepted/`` but holds no site key."""

from __future__ import annotations

import re

import json
import shutil
from pathlib import Path

import pytest

from secure_oneshot.bundle import inspect_bundle
from secure_oneshot.cli import main
from secure_oneshot.errors import BundleAuthError, ConfigError, PolicyViolationError, ResourceError
from secure_oneshot.policy.load import load_ingest_policy
from secure_oneshot.server.ingest import IngestFolders
from secure_oneshot.server.registry import server_lock
from secure_oneshot.server.study import load_accepted

from .conftest import NOW
from .ingest_helpers import CAST, run_ingest, seal, server_cli_args, server_policy_copy


@pytest.fixture()
def server(tmp_path: Path) -> tuple[IngestFolders, Path]:
    """A server folder with one accepted bundle, ingested under a private copy of the example policy."""
    (tmp_path / "inbox").mkdir()
    seal(tmp_path / "inbox" / "site-a.sob")
    policy = server_policy_copy(tmp_path / "policies")
    folders, outcomes = run_ingest(tmp_path, policy)
    assert [o.outcome for o in outcomes] == ["accepted"]
    return folders, policy


def load(folders: IngestFolders, policy=None):
    return load_accepted(folders, CAST.server, CAST.server_trust(), policy, now=NOW)   # the bundles were sealed at NOW


def only_stored(folders: IngestFolders) -> Path:
    (stored,) = folders.accepted.glob("*.sob")
    return stored


def test_the_accepted_bundle_loads_with_the_recorded_or_a_given_policy(server) -> None:
    folders, policy_path = server
    (site,) = load(folders)
    assert site.bundle_id == inspect_bundle(only_stored(folders)).bundle_id and site.config.architecture == "small-cnn"
    (again,) = load(folders.accepted, load_ingest_policy(policy_path))  # the accepted/ folder alone works too
    assert again.bundle_id == site.bundle_id


def test_an_unlisted_bundle_is_refused(server, tmp_path: Path) -> None:
    folders, _ = server
    planted = seal(tmp_path / "planted.sob", seed=7)  # validly signed by a trusted site, but never ingested
    shutil.copy(planted, folders.accepted / f"{inspect_bundle(planted).bundle_id}.sob")
    with pytest.raises(ConfigError, match="not listed in the accepted registry"):
        load(folders)


def test_a_changed_stored_file_is_refused(server, tmp_path: Path) -> None:
    folders, _ = server
    stored = only_stored(folders)
    stored.write_bytes(seal(tmp_path / "other.sob", seed=7).read_bytes())  # another valid bundle under the accepted name
    with pytest.raises(BundleAuthError, match="SHA-256 mismatch"):
        load(folders)


def _register_without_ingest(folders: IngestFolders, planted: Path) -> str:
    """What an attacker with write access to accepted/ can do: a bundle plus a registry entry with the right hash."""
    import hashlib

    bundle_id = inspect_bundle(planted).bundle_id
    entry = json.loads(next(folders.accepted.glob("*.json")).read_text())
    entry.update(bundle_id=bundle_id, file_sha256=hashlib.sha256(planted.read_bytes()).hexdigest())
    shutil.copy(planted, folders.accepted / f"{bundle_id}.sob")
    (folders.accepted / f"{bundle_id}.json").write_text(json.dumps(entry))
    return bundle_id


def test_a_registered_bundle_that_the_ledger_never_accepted_is_refused(server, tmp_path: Path) -> None:
    folders, _ = server
    bundle_id = _register_without_ingest(folders, seal(tmp_path / "planted.sob", seed=7))
    with pytest.raises(BundleAuthError, match=f"bundle {bundle_id} is in accepted/ but not in the replay ledger"):
        load(folders)


def test_a_stored_file_holding_another_bundle_is_refused(server, tmp_path: Path) -> None:
    folders, _ = server
    stored = only_stored(folders)
    other = seal(tmp_path / "other.sob", seed=7)
    entry_path = stored.with_suffix(".json")
    entry = json.loads(entry_path.read_text())
    import hashlib

    entry["file_sha256"] = hashlib.sha256(other.read_bytes()).hexdigest()  # the ledgered id, but another bundle's bytes
    entry_path.write_text(json.dumps(entry))
    shutil.copy(other, stored)
    with pytest.raises(BundleAuthError, match=f"holds bundle {inspect_bundle(other).bundle_id}, not"):
        load(folders)


def test_a_registry_entry_that_names_another_file_is_refused(server) -> None:
    folders, _ = server
    entry_path = only_stored(folders).with_suffix(".json")
    entry = json.loads(entry_path.read_text())
    entry["bundle_id"] = "0" * 32
    entry_path.write_text(json.dumps(entry))
    with pytest.raises(ConfigError, match="does not name its own bundle id"):
        load(folders)


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"bundle_id": ' + b"[" * 70 + b"]" * 70 + b"}", b"\xff\xfe", b"[]",
                                  b'{"a": 1, "a": 2}'], ids=["deep", "deep-inside-an-object", "not-utf8", "not-an-object", "duplicate-key"])
def test_a_hostile_registry_entry_is_a_config_error(server, body: bytes) -> None:
    folders, _ = server
    only_stored(folders).with_suffix(".json").write_bytes(body)
    with pytest.raises(ConfigError, match="registry entry"):
        load(folders)


def test_the_policy_is_checked_again(server) -> None:
    folders, policy_path = server
    text = policy_path.read_text()
    policy_path.write_text(text + "\n# edited after the bundle was accepted\n")
    with pytest.raises(ConfigError, match="changed since it accepted the bundle"):
        load(folders)
    stricter = policy_path.with_name("stricter.toml")
    stricter.write_text(re.sub(r"(?m)^architectures = \[.*\]$", 'architectures = ["resnet18"]', text))
    assert "small-cnn" not in stricter.read_text().split("architectures")[1].splitlines()[0]
    with pytest.raises(PolicyViolationError, match="refused by ingest policy"):
        load(folders, load_ingest_policy(stricter))


def test_loading_waits_for_no_one_while_an_ingest_runs(server) -> None:
    folders, _ = server
    with server_lock(folders.root):
        with pytest.raises(ResourceError, match="busy"):
            load(folders)


def test_distill_command_refuses_an_unlisted_bundle(server, tmp_path: Path, capsys) -> None:
    folders, policy_path = server
    planted = seal(tmp_path / "planted.sob", seed=7)
    shutil.copy(planted, folders.accepted / f"{inspect_bundle(planted).bundle_id}.sob")
    code = main(["distill", "--server-dir", str(folders.root), *server_cli_args(tmp_path), "--policy", str(policy_path),
                 "--preset", "smoke", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and "not listed in the accepted registry" in err and "hint:" in err
    assert not (folders.root / "global").exists()

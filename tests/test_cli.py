"""In-process tests of the ``secure-oneshot`` command line (``secure_oneshot.cli.main``).

Every test runs in its own ``tmp_path`` (the current directory) with a small
"world" built through the CLI itself: a sending site, a receiving server and an
outsider, all passphrase-protected (with the fast test-only Argon2id profile),
the site trusted as sender in the default trust store ``keys/trust.toml``, and
a small hand-built safetensors file.

Layout:
  helpers and fixtures
  success paths (keys, seal, inspect, verify, open)
  one test per error class, human and ``--json`` output
  ``-v`` tracebacks, privacy of secrets
  regressions for bugs these tests found
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import stat
import struct
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import secure_oneshot.cli.bundle_cmd as bundle_cmd
import secure_oneshot.cli.keys_cmd as keys_cmd
from secure_oneshot._internal.compat import tomllib
from secure_oneshot._internal.encoding import b64encode, utc_now
from secure_oneshot.bundle import ReplayLedger, inspect_bundle, seal_tensors
from secure_oneshot.cli import main
from secure_oneshot.errors import (
    BundleAuthError,
    BundleFormatError,
    ConfigError,
    FreshnessError,
    KeyMaterialError,
    NotARecipientError,
    PassphraseError,
    ReplayError,
    ResourceError,
    SecureOneshotError,
    TensorPayloadError,
    TrustError,
)
from secure_oneshot.keys import FAST_INSECURE_KDF, format_key_id, load_identity, load_public, save_identity

PASS_ENV = "SECURE_ONESHOT_PASSPHRASE"
TRUST_ENV = "SECURE_ONESHOT_TRUST"
WORLD_PASSPHRASE = "world passphrase 0b5e"
ERROR_PREFIX = "secure-oneshot: error: "


# --------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    """What one CLI run produced."""

    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)

    @property
    def text(self) -> str:
        return self.out + self.err


def run(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> Outcome:
    """Run ``secure-oneshot ARGV`` in-process and capture its exit code, stdout and stderr."""
    capsys.readouterr()  # drop anything printed before this run
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


def run_ok(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> Outcome:
    result = run(capsys, *argv)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    return result


def run_usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """argparse usage errors exit with SystemExit(2); return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc_info:
        main(list(argv))
    assert exc_info.value.code == 2
    return capsys.readouterr().err


def assert_clean_error(result: Outcome, error: type[SecureOneshotError], exit_code: int, *, as_json: bool) -> None:
    """One error line, then one hint line, no traceback; with --json the same error as JSON on stdout."""
    assert error.exit_code == exit_code  # the table in errors.py agrees with the test
    assert result.code == exit_code, result.err
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert lines, "nothing on stderr"
    assert lines[0].startswith(ERROR_PREFIX), result.err
    assert len(lines) >= 2 and lines[1].startswith("hint: "), result.err
    if as_json:
        payload = json.loads(result.out)
        assert payload["ok"] is False
        assert payload["error"]["type"] == error.__name__
        assert payload["error"]["exit_code"] == exit_code
        assert payload["error"]["message"] == lines[0].removeprefix(ERROR_PREFIX)
        assert payload["error"]["hint"] == lines[1].removeprefix("hint: ")
    else:
        assert result.out == ""


def expect_error(
    capsys: pytest.CaptureFixture[str], argv: list[str | os.PathLike[str]], error: type[SecureOneshotError], exit_code: int
) -> Outcome:
    """Run ``argv`` plainly and with ``--json``; both must fail cleanly with ``error``.  Returns the plain run."""
    plain = run(capsys, *argv)
    assert_clean_error(plain, error, exit_code, as_json=False)
    as_json = run(capsys, "--json", *argv)
    assert_clean_error(as_json, error, exit_code, as_json=True)
    return plain


def error_message(result: Outcome) -> str:
    return result.err.splitlines()[0].removeprefix(ERROR_PREFIX)


def safetensors_bytes(header_json: bytes, data: bytes) -> bytes:
    """A safetensors file built by hand: u64le(len) || header JSON (space-padded to 8) || data."""
    header_json += b" " * (-len(header_json) % 8)
    return struct.pack("<Q", len(header_json)) + header_json + data


def valid_safetensors() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]},
    }
    data = struct.pack("<8f", 0.5, -0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    return safetensors_bytes(json.dumps(header, separators=(",", ":")).encode(), data)


def stream_offset(bundle: Path) -> int:
    """Where the encrypted stream starts: after magic, u32be(len), header JSON and the 32-byte header MAC."""
    raw = bundle.read_bytes()
    magic_len = len(b"secure-oneshot/v1\n")
    header_len = int.from_bytes(raw[magic_len : magic_len + 4], "big")
    return magic_len + 4 + header_len + 32


def flip_bit(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def secret_forms(key_file: Path, passphrase: str | None) -> list[str]:
    """Every printable form of a private key file's secrets that must never be shown."""
    identity = load_identity(key_file, passphrase.encode() if passphrase is not None else None)
    secret = identity.secret_bytes()
    forms = []
    for part in (secret, secret[:32], secret[32:]):
        forms += [b64encode(part), part.hex()]
    fields = tomllib.loads(key_file.read_text())
    forms += [str(fields[name]) for name in ("ciphertext", "secret") if name in fields]
    return forms


def assert_no_secrets(outputs: list[Outcome], secrets: list[str]) -> None:
    assert outputs and all(s for s in secrets)
    for result in outputs:
        for secret in secrets:
            assert secret.lower() not in result.text.lower(), f"secret leaked in output:\n{result.text}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path, with no passphrase or trust-store variables from the caller and no terminal."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PASS_ENV, raising=False)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # never prompt (isatty() is False)
    return tmp_path


@pytest.fixture()
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `keys new` use the fast test-only Argon2id profile (its default is bound at def time)."""
    monkeypatch.setattr(keys_cmd, "save_identity", functools.partial(save_identity, kdf=FAST_INSECURE_KDF))


@dataclass
class World:
    site_key: Path
    site_pub: Path
    server_key: Path
    server_pub: Path
    outsider_key: Path
    outsider_pub: Path
    trust: Path
    model: Path

    def key_id(self, pub: Path) -> str:
        return load_public(pub).key_id


@pytest.fixture()
def world(isolated: Path, fast_kdf: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> World:
    """Site, server and outsider identities (protected by WORLD_PASSPHRASE), a trust store, a model file."""
    monkeypatch.setenv(PASS_ENV, WORLD_PASSPHRASE)
    for name in ("site", "server", "outsider"):
        run_ok(capsys, "keys", "new", "--name", name, "--out", "keys")
    run_ok(capsys, "keys", "trust", "add", "keys/site.pub", "--role", "sender", "--note", "confirmed by phone")
    model = isolated / "model.safetensors"
    model.write_bytes(valid_safetensors())
    k = Path("keys")
    return World(k / "site.key", k / "site.pub", k / "server.key", k / "server.pub",
                 k / "outsider.key", k / "outsider.pub", k / "trust.toml", model)


@pytest.fixture()
def bundle(world: World, capsys: pytest.CaptureFixture[str]) -> Path:
    """The model sealed by the site to the server, through the CLI."""
    run_ok(capsys, "seal", world.model, "--key", world.site_key, "--to", world.server_pub, "--out", "model.sob")
    return Path("model.sob")


def seal_via_api(world: World, out: str, *, sender_key: Path | None = None, **kwargs) -> Path:
    """Seal a small tensor dict with the library API (for cases the CLI cannot produce)."""
    sender = load_identity(sender_key or world.site_key, WORLD_PASSPHRASE.encode())
    seal_tensors(kwargs.pop("tensors", {"w": torch.ones(3)}), out, sender=sender,
                 recipients=[load_public(world.server_pub)], **kwargs)
    return Path(out)


def open_args(bundle: Path, world: World, *extra: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    return ["open", bundle, "--key", world.server_key, *extra]


# --------------------------------------------------------------------------- success: keys


def test_keys_new_insecure_no_passphrase(capsys):
    result = run_ok(capsys, "keys", "new", "--name", "demo", "--out", "keys", "--insecure-no-passphrase")
    key, pub = Path("keys/demo.key"), Path("keys/demo.pub")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pub.exists()
    public = load_public(pub)
    assert result.out.splitlines()[0] == "created identity demo"
    assert format_key_id(public.key_id) in result.out
    assert "NOT passphrase-protected" in result.out
    assert "secure-oneshot: warning: writing a private key WITHOUT passphrase protection" in result.err
    assert 'protection = "none-INSECURE"' in key.read_text()

    result = run_ok(capsys, "keys", "new", "--name", "demo2", "--out", "keys", "--insecure-no-passphrase", "--json")
    data = result.json()
    assert data["ok"] is True
    assert data["name"] == "demo2"
    assert data["passphrase_protected"] is False
    assert data["private_key_file"] == os.path.join("keys", "demo2.key")
    assert data["public_key_file"] == os.path.join("keys", "demo2.pub")
    assert data["key_id"] == load_public("keys/demo2.pub").key_id
    assert data["fingerprint"] == format_key_id(data["key_id"])


def test_keys_new_with_passphrase_from_env(capsys, monkeypatch, fast_kdf):
    monkeypatch.setenv(PASS_ENV, "a good long passphrase")
    result = run_ok(capsys, "--json", "keys", "new", "--name", "st-marys", "--out", "keys")
    data = result.json()
    assert data["ok"] is True and data["passphrase_protected"] is True
    key = Path("keys/st-marys.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fields = tomllib.loads(key.read_text())
    assert fields["protection"] == "argon2id-xchacha20poly1305"
    assert fields["argon2id_memlimit"] == FAST_INSECURE_KDF.memlimit  # the monkeypatch took effect
    assert "secret" not in fields
    assert result.err == ""  # no plaintext-key warning
    assert load_identity(key, b"a good long passphrase").key_id == data["key_id"]


def test_keys_new_passphrase_env_option_names_another_variable(capsys, monkeypatch, fast_kdf):
    monkeypatch.setenv("MY_PASS", "from another variable")
    run_ok(capsys, "keys", "new", "--name", "x", "--out", "keys", "--passphrase-env", "MY_PASS")
    assert load_identity("keys/x.key", b"from another variable").name == "x"


def test_keys_new_force_replaces(world, capsys):
    old = world.key_id(world.site_pub)
    expect_error(capsys, ["keys", "new", "--name", "site", "--out", "keys"], ResourceError, 9)
    assert world.key_id(world.site_pub) == old  # untouched
    run_ok(capsys, "keys", "new", "--name", "site", "--out", "keys", "--force")
    assert world.key_id(world.site_pub) != old


@pytest.mark.parametrize("which", ["pub", "key"])
def test_keys_show(world, capsys, which):
    path = world.site_pub if which == "pub" else world.site_key
    public = load_public(world.site_pub)
    human = run_ok(capsys, "keys", "show", path)
    assert f"key_id          {public.key_id}" in human.out.splitlines()
    assert f"fingerprint     {format_key_id(public.key_id)}" in human.out.splitlines()
    data = run_ok(capsys, "keys", "show", path, "--json").json()
    assert data == {"ok": True, **public.public_fields(), "fingerprint": format_key_id(public.key_id)}


def test_keys_fingerprint(world, capsys):
    key_id = world.key_id(world.server_pub)
    assert run_ok(capsys, "keys", "fingerprint", world.server_pub).out == format_key_id(key_id) + "\n"
    data = run_ok(capsys, "--json", "keys", "fingerprint", world.server_key).json()
    assert data == {"ok": True, "key_id": key_id, "fingerprint": format_key_id(key_id)}


def test_keys_trust_add_list_revoke(world, capsys):
    site_id, server_id = world.key_id(world.site_pub), world.key_id(world.server_pub)
    added = run_ok(capsys, "keys", "trust", "add", world.server_pub, "--role", "recipient", "--role", "sender",
                   "--expires", "2099-12-31", "--json").json()
    assert added["store"] == os.path.join("keys", "trust.toml")
    assert added["roles"] == ["recipient", "sender"]
    assert added["expires"] == "2099-12-31T00:00:00Z"
    assert added["added"]["key_id"] == server_id

    listing = run_ok(capsys, "keys", "trust", "list", "--json").json()
    by_name = {e["name"]: e for e in listing["identities"]}
    assert by_name["site"]["roles"] == ["sender"] and by_name["site"]["note"] == "confirmed by phone"
    assert by_name["site"]["expires"] is None
    assert by_name["server"]["roles"] == ["recipient", "sender"]
    assert listing["revoked"] == []
    human = run_ok(capsys, "keys", "trust", "list").out
    assert human.splitlines()[0] == f"trust store {os.path.join('keys', 'trust.toml')}"
    assert format_key_id(site_id) in human and "expires never" in human

    # The grouped form printed by `keys fingerprint` is accepted.
    revoked = run_ok(capsys, "keys", "trust", "revoke", format_key_id(site_id), "--reason", "laptop stolen")
    assert "laptop stolen" in revoked.out
    listing = run_ok(capsys, "keys", "trust", "list", "--json").json()
    assert [r["key_id"] for r in listing["revoked"]] == [site_id]
    assert listing["revoked"][0]["reason"] == "laptop stolen"
    assert f"REVOKED {site_id}" in run_ok(capsys, "keys", "trust", "list").out


def test_trust_store_from_environment_variable(world, bundle, capsys, monkeypatch):
    moved = Path("elsewhere.toml")
    world.trust.rename(moved)
    monkeypatch.setenv(TRUST_ENV, str(moved))
    assert run_ok(capsys, "keys", "trust", "list", "--json").json()["store"] == str(moved)
    run_ok(capsys, "verify", bundle, "--key", world.server_key)


# --------------------------------------------------------------------------- success: bundles


def test_seal(world, capsys):
    result = run_ok(capsys, "seal", world.model, "--key", world.site_key, "--to", world.server_pub,
                    "--out", "a.sob", "--policy-id", "policy-1", "--valid-days", "2")
    assert result.out.splitlines()[0] == f"sealed {world.model} -> a.sob"
    assert Path("a.sob").exists()
    data = run_ok(capsys, "seal", world.model, "--key", world.site_key, "--to", world.server_pub,
                  "--to", world.outsider_pub, "--out", "b.sob", "--json").json()
    header = data["header"]
    assert data["ok"] is True and data["bundle"] == "b.sob"
    assert header["sender"] == world.key_id(world.site_pub)
    assert header["recipients"] == [world.key_id(world.server_pub), world.key_id(world.outsider_pub)]
    assert header["payload_size"] == world.model.stat().st_size
    assert len(data["payload_sha256"]) == 64


def test_seal_check_recipients(world, capsys):
    run_ok(capsys, "keys", "trust", "add", world.server_pub, "--role", "recipient")
    run_ok(capsys, "seal", world.model, "--key", world.site_key, "--to", world.server_pub, "--out", "a.sob",
           "--check-recipients")


@pytest.mark.parametrize("argv_json", [["--json", "inspect"], ["inspect", "--json"]], ids=["json-before", "json-after"])
def test_inspect_json(world, bundle, capsys, argv_json):
    data = run_ok(capsys, *argv_json, bundle).json()
    header = inspect_bundle(bundle)
    assert data["ok"] is True and data["verified"] is False
    assert data["header"]["bundle_id"] == header.bundle_id
    assert data["header"]["format"] == "secure-oneshot/v1"
    assert data["header"]["sender"] == world.key_id(world.site_pub)
    assert data["header"]["recipients"] == [world.key_id(world.server_pub)]


def test_inspect_human(world, bundle, capsys):
    out = run_ok(capsys, "inspect", bundle).out
    lines = out.splitlines()
    assert lines[0] == f"bundle     {inspect_bundle(bundle).bundle_id}"
    assert f"sender     {format_key_id(world.key_id(world.site_pub))}" in lines
    assert "nothing is verified" in lines[-1]


def test_verify_writes_nothing(world, bundle, capsys, isolated):
    before = sorted(p.relative_to(isolated) for p in isolated.rglob("*"))
    result = run_ok(capsys, "verify", bundle, "--key", world.server_key)
    assert result.out.startswith(f"VERIFIED bundle {inspect_bundle(bundle).bundle_id} from site")
    assert "  weight  float32  (2, 3)" in result.out.splitlines()
    data = run_ok(capsys, "verify", bundle, "--key", world.server_key, "--json").json()
    assert data["verified"] is True and data["sender_name"] == "site"
    assert data["tensors"] == {"bias": {"dtype": "float32", "shape": [2]}, "weight": {"dtype": "float32", "shape": [2, 3]}}
    assert sorted(p.relative_to(isolated) for p in isolated.rglob("*")) == before


def test_open_out_writes_identical_payload_0600(world, bundle, capsys):
    result = run_ok(capsys, *open_args(bundle, world, "--out", "opened.safetensors"))
    out = Path("opened.safetensors")
    assert out.read_bytes() == world.model.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert result.out.splitlines()[-1] == "wrote opened.safetensors (mode 0600)"
    data = run_ok(capsys, "--json", *open_args(bundle, world, "--out", "again.safetensors")).json()
    assert data["ok"] is True and data["verified"] is True and data["out"] == "again.safetensors"
    assert Path("again.safetensors").read_bytes() == world.model.read_bytes()


def test_open_ledger_records_bundle(world, bundle, capsys):
    run_ok(capsys, *open_args(bundle, world, "--ledger", "ledger.db", "--out", "opened.safetensors"))
    ledger = ReplayLedger("ledger.db")
    try:
        assert ledger.contains(inspect_bundle(bundle).bundle_id)
    finally:
        ledger.close()
    assert Path("opened.safetensors").read_bytes() == world.model.read_bytes()


def test_open_allow_nonfinite(world, capsys):
    sob = seal_via_api(world, "nan.sob", tensors={"w": torch.tensor([1.0, math.nan])})
    result = expect_error(capsys, open_args(sob, world, "--out", "x.safetensors"), TensorPayloadError, 13)
    assert "NaN" in error_message(result)
    assert not Path("x.safetensors").exists()
    run_ok(capsys, *open_args(sob, world, "--out", "x.safetensors", "--allow-nonfinite"))


def test_version(capsys):
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.startswith("secure-oneshot ")


# --------------------------------------------------------------------------- errors, one class at a time


def test_usage_error_missing_required_argument(world, capsys):
    err = run_usage_error(capsys, "seal", str(world.model), "--to", str(world.server_pub), "--out", "x.sob")
    assert "the following arguments are required: --key" in err
    assert "Traceback" not in err
    assert not Path("x.sob").exists()


@pytest.mark.parametrize("argv", [[], ["--json"], ["keys"], ["keys", "trust"], ["nonsense"],
                                  ["seal", "m.safetensors", "--key", "k", "--to", "p", "--out", "o", "--valid-days", "soon"]])
def test_usage_errors(capsys, argv):
    err = run_usage_error(capsys, *argv)
    assert err.startswith("usage: secure-oneshot")
    assert "Traceback" not in err


def test_config_error_unknown_key_in_trust_store(world, bundle, capsys):
    world.trust.write_text(world.trust.read_text().replace("[[identity]]\n", '[[identity]]\ncolour = "blue"\n'))
    result = expect_error(capsys, open_args(bundle, world, "--out", "x.safetensors"), ConfigError, 3)
    assert "unknown key(s) colour" in error_message(result)
    expect_error(capsys, ["keys", "trust", "list"], ConfigError, 3)


def test_config_error_missing_trust_store(world, bundle, capsys):
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key, "--trust", "missing.toml"], ConfigError, 3)
    assert "missing.toml not found" in error_message(result)
    assert "keys trust add" in result.err.splitlines()[1]


@pytest.mark.parametrize("argv", [
    ["keys", "trust", "add", "keys/site.pub", "--role", "sender", "--expires", "2027-13-45"],
    ["keys", "trust", "revoke", "not-a-key-id", "--reason", "typo"],
], ids=["bad-expires", "bad-key-id"])
def test_config_error_bad_trust_arguments(world, capsys, argv):
    before = world.trust.read_text()
    expect_error(capsys, argv, ConfigError, 3)
    assert world.trust.read_text() == before


def test_key_material_error_missing_key_file(world, bundle, capsys):
    result = expect_error(capsys, ["verify", bundle, "--key", "keys/nobody.key"], KeyMaterialError, 4)
    assert "keys/nobody.key not found" in error_message(result)
    expect_error(capsys, ["keys", "show", "keys/nobody.pub"], KeyMaterialError, 4)


def test_key_material_error_pub_passed_as_key(world, bundle, capsys):
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_pub], KeyMaterialError, 4)
    assert "not a private key file" in error_message(result)
    assert result.err.splitlines()[1] == "hint: pass the .key file, not the .pub file"


def test_key_material_error_invalid_name(capsys):
    expect_error(capsys, ["keys", "new", "--name", "no spaces", "--out", "keys", "--insecure-no-passphrase"], KeyMaterialError, 4)


def test_passphrase_error_wrong_passphrase(world, bundle, capsys, monkeypatch):
    monkeypatch.setenv(PASS_ENV, "wrong passphrase")
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key], PassphraseError, 4)
    assert "wrong passphrase" in error_message(result)
    expect_error(capsys, ["seal", world.model, "--key", world.site_key, "--to", world.server_pub, "--out", "x.sob"],
                 PassphraseError, 4)
    assert not Path("x.sob").exists()


def test_passphrase_error_no_terminal_and_no_variable(world, bundle, capsys, monkeypatch):
    monkeypatch.delenv(PASS_ENV)
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key], PassphraseError, 4)
    assert "no terminal" in error_message(result)


def test_passphrase_error_empty_new_passphrase(capsys, monkeypatch, fast_kdf):
    monkeypatch.setenv(PASS_ENV, "")
    expect_error(capsys, ["keys", "new", "--name", "x", "--out", "keys"], PassphraseError, 4)
    assert not Path("keys/x.key").exists()


def test_not_a_recipient_error(world, bundle, capsys):
    result = expect_error(capsys, ["open", bundle, "--key", world.outsider_key, "--out", "x.safetensors"],
                          NotARecipientError, 4)
    assert "is not encrypted to outsider" in error_message(result)
    assert world.key_id(world.server_pub) in result.err.splitlines()[1]
    assert not Path("x.safetensors").exists()


@pytest.mark.parametrize("what", ["not-a-bundle", "missing", "directory", "bad-version"])
def test_bundle_format_error(world, capsys, what):
    path = {"not-a-bundle": world.model, "missing": Path("missing.sob"), "directory": Path("keys")}.get(what)
    if what == "bad-version":
        path = Path("v9.sob")
        path.write_bytes(b"secure-oneshot/v9\n" + bytes(100))
    expect_error(capsys, ["inspect", path], BundleFormatError, 5)
    expect_error(capsys, open_args(path, world, "--out", "x.safetensors"), BundleFormatError, 5)
    assert not Path("x.safetensors").exists()


@pytest.mark.parametrize("where", ["stream-start", "stream-end", "header-mac"])
def test_bundle_auth_error_bit_flip(world, bundle, capsys, where):
    start = stream_offset(bundle)
    offset = {"stream-start": start + 5, "stream-end": bundle.stat().st_size - 1, "header-mac": start - 32}[where]
    flip_bit(bundle, offset)
    run_ok(capsys, "inspect", bundle)  # the public header is still readable
    expect_error(capsys, ["verify", bundle, "--key", world.server_key], BundleAuthError, 6)
    expect_error(capsys, open_args(bundle, world, "--out", "x.safetensors", "--ledger", "ledger.db"), BundleAuthError, 6)
    assert not Path("x.safetensors").exists()
    ledger = ReplayLedger("ledger.db")
    try:
        assert not ledger.contains(inspect_bundle(bundle).bundle_id)
    finally:
        ledger.close()


def test_resource_error_refuses_binary_to_stdout(world, bundle, capsys):
    result = expect_error(capsys, open_args(bundle, world, "--out", "-"), ResourceError, 9)
    assert "refusing to write decrypted tensors to standard output" in error_message(result)
    assert "--out FILE" in result.err.splitlines()[1]


def test_resource_error_unwritable_output(world, bundle, capsys):
    expect_error(capsys, open_args(bundle, world, "--out", "no/such/dir/x.safetensors"), ResourceError, 9)
    expect_error(capsys, ["seal", world.model, "--key", world.site_key, "--to", world.server_pub, "--out", "no/dir/x.sob"],
                 ResourceError, 9)


def test_trust_error_sender_not_in_trust_store(world, capsys):
    run_ok(capsys, "seal", world.model, "--key", world.outsider_key, "--to", world.server_pub, "--out", "o.sob")
    result = expect_error(capsys, open_args(Path("o.sob"), world, "--out", "x.safetensors"), TrustError, 10)
    assert f"sender {world.key_id(world.outsider_pub)} is not in the trust store" == error_message(result)
    assert not Path("x.safetensors").exists()


def test_trust_error_revoked_sender(world, bundle, capsys):
    run_ok(capsys, "keys", "trust", "revoke", world.key_id(world.site_pub), "--reason", "laptop stolen")
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key], TrustError, 10)
    assert "revoked" in error_message(result) and "laptop stolen" in error_message(result)


def test_trust_error_expired_or_wrong_role(world, bundle, capsys):
    run_ok(capsys, "keys", "trust", "add", world.site_pub, "--role", "sender", "--expires", "2001-01-01")
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key], TrustError, 10)
    assert "expired on 2001-01-01T00:00:00Z" in error_message(result)
    run_ok(capsys, "keys", "trust", "add", world.site_pub, "--role", "recipient")
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_key], TrustError, 10)
    assert "not as sender" in error_message(result)


def test_trust_error_seal_check_recipients(world, capsys):
    expect_error(capsys, ["seal", world.model, "--key", world.site_key, "--to", world.server_pub, "--out", "x.sob",
                          "--check-recipients"], TrustError, 10)
    assert not Path("x.sob").exists()


def test_replay_error_second_open(world, bundle, capsys):
    args = open_args(bundle, world, "--ledger", "ledger.db", "--out", "first.safetensors")
    run_ok(capsys, *args)
    result = expect_error(capsys, open_args(bundle, world, "--ledger", "ledger.db", "--out", "second.safetensors"),
                          ReplayError, 11)
    assert f"bundle {inspect_bundle(bundle).bundle_id} was already accepted" in error_message(result)
    assert not Path("second.safetensors").exists()
    # verify consults the ledger too
    expect_error(capsys, ["verify", bundle, "--key", world.server_key, "--ledger", "ledger.db"], ReplayError, 11)


@pytest.mark.parametrize("age", ["expired", "future"])
def test_freshness_error(world, capsys, age):
    now = utc_now() - timedelta(days=30) if age == "expired" else utc_now() + timedelta(days=1)
    sob = seal_via_api(world, f"{age}.sob", now=now, valid_for=timedelta(days=7))
    result = expect_error(capsys, open_args(sob, world, "--out", "x.safetensors"), FreshnessError, 12)
    assert ("expired at" if age == "expired" else "in the future") in error_message(result)
    assert not Path("x.safetensors").exists()


@pytest.mark.parametrize(("content", "expected"), [
    # duplicate tensor name: the reference parser would silently keep the last one
    (safetensors_bytes(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                       b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', struct.pack("<f", 1.0)),
     "duplicate key 'w'"),
    (safetensors_bytes(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', struct.pack("<2f", 1.0, math.nan)),
     "NaN"),
    (safetensors_bytes(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', bytes(8)), "hole"),
    (b"", "empty"),
], ids=["duplicate-name", "nan", "hole", "empty"])
def test_tensor_payload_error_seal_malformed_safetensors(world, capsys, content, expected):
    bad = Path("bad.safetensors")
    bad.write_bytes(content)
    result = expect_error(capsys, ["seal", bad, "--key", world.site_key, "--to", world.server_pub, "--out", "bad.sob"],
                          TensorPayloadError, 13)
    assert expected in error_message(result)
    assert not Path("bad.sob").exists()


def test_keyboard_interrupt_exits_130(world, bundle, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_cmd, "inspect_bundle", interrupted)
    result = run(capsys, "inspect", bundle)
    assert result.code == 130
    assert result.err == "secure-oneshot: interrupted\n"


# --------------------------------------------------------------------------- -v


@pytest.mark.parametrize("position", ["before", "after"])
def test_verbose_error_shows_traceback_and_same_exit_code(world, bundle, capsys, position):
    argv = ["verify", bundle, "--key", world.server_key, "--trust", "missing.toml"]
    argv = ["-v", *argv] if position == "before" else [*argv, "-v"]
    result = run(capsys, *argv)
    assert result.code == 3
    assert "Traceback (most recent call last)" in result.err
    assert "ConfigError" in result.err
    assert f"{ERROR_PREFIX}trust store missing.toml not found" in result.err.splitlines()
    assert result.err.splitlines()[-1].startswith("hint: ")


def test_verbose_json_error(world, capsys):
    result = run(capsys, "-v", "--json", "inspect", world.model)
    assert result.code == 5
    assert "Traceback" in result.err
    assert result.json()["error"]["type"] == "BundleFormatError"


# --------------------------------------------------------------------------- privacy of secrets


def test_secrets_never_printed(world, capsys, monkeypatch):
    passphrase = "correct horse battery staple 7f3a"
    monkeypatch.setenv(PASS_ENV, passphrase)
    outputs: list[Outcome] = []
    keys: list[Path] = []
    for flags in ([], ["--json"]):
        name = "hospital-json" if flags else "hospital"
        key = Path("keys") / f"{name}.key"
        keys.append(key)
        outputs.append(run_ok(capsys, *flags, "keys", "new", "--name", name, "--out", "keys"))
        outputs.append(run_ok(capsys, *flags, "keys", "show", key))
        outputs.append(run_ok(capsys, *flags, "keys", "fingerprint", key))
        outputs.append(run_ok(capsys, *flags, "seal", world.model, "--key", key, "--to", world.server_pub, "--out", f"{name}.sob"))

    monkeypatch.setenv(PASS_ENV, "not the passphrase")
    for flags in ([], ["--json"], ["-v"], ["-v", "--json"]):
        result = run(capsys, *flags, "seal", world.model, "--key", keys[0], "--to", world.server_pub, "--out", "x.sob")
        assert result.code == 4 and "wrong passphrase" in result.err
        outputs.append(result)

    secrets = [passphrase]
    for key in keys:
        forms = secret_forms(key, passphrase)
        assert tomllib.loads(key.read_text())["ciphertext"] in forms  # the check is not vacuous
        secrets += forms
    assert any(world.key_id(Path("keys/hospital.pub")) in o.out for o in outputs)  # outputs are real
    assert_no_secrets(outputs, secrets)


def test_unprotected_secret_never_printed(world, capsys):
    outputs = [run_ok(capsys, "keys", "new", "--name", "demo", "--out", "keys", "--insecure-no-passphrase", "--json")]
    key = Path("keys/demo.key")
    for flags in ([], ["--json"]):
        outputs.append(run_ok(capsys, *flags, "keys", "show", key))
        outputs.append(run_ok(capsys, *flags, "seal", world.model, "--key", key, "--to", world.server_pub, "--out", "d.sob"))
    secrets = secret_forms(key, None)
    assert tomllib.loads(key.read_text())["secret"] in secrets
    assert_no_secrets(outputs, secrets)


# --------------------------------------------------------------------------- regressions (bugs found by these tests)


def test_open_without_out_is_a_usage_error(world, bundle, capsys):
    """Was a TypeError traceback when stdout was not a terminal; --out is now required."""
    assert "--out" in run_usage_error(capsys, *map(str, open_args(bundle, world)))


@pytest.mark.parametrize("source", [
    "missing.safetensors",  # was a FileNotFoundError traceback
    "keys",  # a directory: was an IsADirectoryError traceback
])
def test_seal_unreadable_input_is_a_clean_error(world, capsys, source):
    result = run(capsys, "seal", source, "--key", world.site_key, "--to", world.server_pub, "--out", "x.sob")
    assert result.code not in (0, 1)
    assert result.err.startswith(ERROR_PREFIX) and "Traceback" not in result.err


@pytest.mark.parametrize("days", [
    "0", "-1", "0.00001", "nan", "inf", "1e7",  # were exit 5 with a misleading hint, or tracebacks
])
def test_seal_bad_valid_days_is_a_usage_error(world, capsys, days):
    err = run_usage_error(capsys, "seal", str(world.model), "--key", str(world.site_key), "--to", str(world.server_pub),
                          "--out", "x.sob", "--valid-days", days)
    assert "--valid-days" in err
    assert not Path("x.sob").exists()


def test_failed_open_write_does_not_consume_the_ledger_entry(world, bundle, capsys):
    failed = run(capsys, *open_args(bundle, world, "--ledger", "ledger.db", "--out", "no/such/dir/x.safetensors"))
    assert_clean_error(failed, ResourceError, 9, as_json=False)
    # The payload was never delivered, so a retry with a good --out must succeed (today: ReplayError, exit 11).
    run_ok(capsys, *open_args(bundle, world, "--ledger", "ledger.db", "--out", "x.safetensors"))


def test_verify_ledger_does_not_create_the_ledger(world, bundle, capsys):
    run_ok(capsys, "verify", bundle, "--key", world.server_key, "--ledger", "ledger.db")
    assert not Path("ledger.db").exists()


def test_pub_as_key_without_passphrase_variable_gets_the_right_hint(world, bundle, capsys, monkeypatch):
    monkeypatch.delenv(PASS_ENV)
    result = expect_error(capsys, ["verify", bundle, "--key", world.server_pub], KeyMaterialError, 4)
    assert result.err.splitlines()[1] == "hint: pass the .key file, not the .pub file"


def test_keys_new_out_is_a_file_is_a_clean_error(world, capsys):
    expect_error(capsys, ["keys", "new", "--name", "x", "--out", world.model], ResourceError, 9)


def test_command_table_matches_what_the_modules_register() -> None:
    """The lazy table (name, module, help) is what the command modules register, command for command."""
    import argparse
    import importlib

    from secure_oneshot.cli import _common_options, build_parser
    from secure_oneshot.cli.commands import COMMANDS

    def registered(parser: argparse.ArgumentParser) -> dict[str, str]:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {choice.dest: choice.help for choice in commands._choices_actions}

    assert registered(build_parser()) == {c.name: c.help for c in COMMANDS}
    for module in {c.module for c in COMMANDS}:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(f"secure_oneshot.cli.{module}").register(sub, _common_options(argparse.SUPPRESS))
        assert sorted(registered(parser)) == sorted(c.name for c in COMMANDS if c.module == module), module
    # The lean parser for one command lists every command and parses that command's full options.
    lean = build_parser("inspect")
    assert registered(lean) == {c.name: c.help for c in COMMANDS}
    assert lean.parse_args(["--json", "inspect", "b.sob"]).bundle == "b.sob"

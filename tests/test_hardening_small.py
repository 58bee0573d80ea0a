"""Attacker-style tests for small hardening rules: each hostile input is one clear error, never a traceback.

Covered: a recipient named twice; tampered Argon2id costs and other damaged
fields in a private key file; a replay ledger path with URI characters; private
key files other users can read; plaintext temporaries left by a killed writer;
the modes of what ``keys`` writes.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from secure_oneshot._internal.atomic import atomic_write_bytes, sweep_stale_temporaries
from secure_oneshot.bundle import ReplayLedger, seal_tensors
from secure_oneshot.bundle.format import MAX_RECIPIENTS
from secure_oneshot.cli import main
from secure_oneshot.errors import KeyMaterialError, PassphraseError, ReplayError, ResourceError, SecureOneshotError
from secure_oneshot.keys import (
    FAST_INSECURE_KDF,
    Identity,
    PublicIdentity,
    TrustEntry,
    TrustStore,
    UnsafePlaintextKeyWarning,
    identity_from_text,
    is_protected,
    load_identity,
    save_identity,
    save_trust_store,
)
from secure_oneshot.keys import keyfile
from secure_oneshot.keys.keyfile import MAX_KEY_FILE_BYTES, MAX_MEMLIMIT, MAX_OPSLIMIT, private_key_text

POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and pids")
PASSPHRASE = "hardening passphrase 7c1d"
PASS_ENV = "SECURE_ONESHOT_PASSPHRASE"
ERROR_PREFIX = "secure-oneshot: error: "


# --------------------------------------------------------------------------- helpers


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str | os.PathLike[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_error(capsys: pytest.CaptureFixture[str], argv: list, error: type[SecureOneshotError]) -> tuple[str, str]:
    """Run ``argv``; it must fail with ``error``'s exit code, one error line and one hint line.  Returns both."""
    code, out, err = run_cli(capsys, *argv)
    assert code == error.exit_code, err
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(ERROR_PREFIX) and lines[1].startswith("hint: "), err
    code, out, _ = run_cli(capsys, "--json", *argv)
    assert code == error.exit_code and json.loads(out)["error"]["type"] == error.__name__
    return lines[0].removeprefix(ERROR_PREFIX), lines[1].removeprefix("hint: ")


def safetensors_file(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    return path


class Site:
    """A site, a server and an outsider with passphrase-protected key files, and a server trust store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ids = {n: Identity.generate(n) for n in ("site", "server", "outsider")}
        for identity in self.ids.values():
            save_identity(identity, root / "keys", PASSPHRASE.encode(), kdf=FAST_INSECURE_KDF)
        self.trust = root / "keys" / "trust.toml"
        save_trust_store(TrustStore().with_entry(TrustEntry(self.ids["site"].public, frozenset({"sender"}))), self.trust)
        self.model = safetensors_file(root / "model.safetensors")

    def key(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"

    def pub(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.pub"


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PASS_ENV, PASSPHRASE)
    return Site(tmp_path)


@pytest.fixture()
def bundle(site: Site, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run_cli(capsys, "seal", site.model, "--key", site.key("site"), "--to", site.pub("server"), "--out", "m.sob")
    assert code == 0, err
    return site.root / "m.sob"


with warnings.catch_warnings():
    warnings.simplefilter("ignore", UnsafePlaintextKeyWarning)
    # Rendered once here, before any test forbids the KDF.
    VICTIM_TEXT = {p: private_key_text(Identity.generate("victim"), p, FAST_INSECURE_KDF) for p in (b"pw", None)}


def key_text(passphrase: bytes | None = b"pw", **replace: str) -> str:
    """A private key file's text with some ``field = value`` lines replaced (value as TOML source) or
    removed (value ``""``)."""
    lines = VICTIM_TEXT[passphrase].splitlines()
    out = []
    for line in lines:
        name = line.split(" = ", 1)[0]
        if name in replace:
            if replace[name]:
                out.append(f"{name} = {replace[name]}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- 1. a recipient named twice


def test_seal_refuses_the_same_recipient_twice_at_the_root(tmp_path: Path) -> None:
    site, server = Identity.generate("site"), Identity.generate("server")
    out = tmp_path / "twice.sob"
    with pytest.raises(KeyMaterialError, match=f"recipient server with key id {server.key_id} is listed twice") as caught:
        seal_tensors({"w": torch.ones(2)}, out, sender=site, recipients=[server.public, server.public])
    assert caught.value.hint == "name each recipient once"
    assert list(tmp_path.iterdir()) == []


def test_seal_refuses_one_key_under_two_names(tmp_path: Path) -> None:
    """Renaming a copy of a .pub file does not make it another recipient: the key id is what counts."""
    site, server = Identity.generate("site"), Identity.generate("server")
    alias = PublicIdentity("backup-server", server.public.sign_public, server.public.encrypt_public)
    with pytest.raises(KeyMaterialError, match="backup-server \\(also as server\\)") as caught:
        seal_tensors({"w": torch.ones(2)}, tmp_path / "b.sob", sender=site, recipients=[server.public, alias])
    assert caught.value.hint == "name each recipient once"


def test_seal_refuses_too_many_or_no_recipients(tmp_path: Path) -> None:
    site = Identity.generate("site")
    crowd = [Identity.generate(f"r{i}").public for i in range(MAX_RECIPIENTS + 1)]
    for recipients in (crowd, []):
        with pytest.raises(KeyMaterialError, match=f"needs 1 to {MAX_RECIPIENTS} recipients, got {len(recipients)}"):
            seal_tensors({"w": torch.ones(2)}, tmp_path / "b.sob", sender=site, recipients=recipients)
    assert list(tmp_path.iterdir()) == []


def test_cli_seal_with_duplicate_to_is_exit_4(site: Site, capsys) -> None:
    copy = site.root / "copy-of-server.pub"
    copy.write_bytes(site.pub("server").read_bytes())
    for second in (site.pub("server"), copy):
        message, hint = cli_error(
            capsys,
            ["seal", site.model, "--key", site.key("site"), "--to", site.pub("server"), "--to", second, "--out", "x.sob"],
            KeyMaterialError,
        )
        assert "listed twice" in message and site.ids["server"].key_id in message
        assert hint == "name each recipient once"
    assert not (site.root / "x.sob").exists()


def test_cli_export_with_duplicate_to_is_refused_before_anything_is_read(site: Site, capsys) -> None:
    # The model and policy do not even exist: the recipient list is refused first.
    message, hint = cli_error(
        capsys,
        ["export", "--model", "no-model", "--policy", "no-policy.toml", "--key", site.key("site"),
         "--to", site.pub("server"), "--to", site.pub("server"), "--out", "x.sob", "--trust", site.trust],
        KeyMaterialError,
    )
    assert "listed twice" in message and hint == "name each recipient once"
    assert not (site.root / "x.sob").exists() and not (site.root / "audit.jsonl").exists()


# --------------------------------------------------------------------------- 2. tampered key file fields


@pytest.fixture()
def no_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of Argon2id fails the test: tampered costs must be refused before the KDF runs."""

    def forbidden(*args, **kwargs):
        raise AssertionError("Argon2id ran on parameters from a tampered key file")

    monkeypatch.setattr(keyfile.argon2id, "kdf", forbidden)


TAMPERED_COSTS = [
    ("argon2id_opslimit", "0", "outside the accepted range"),
    ("argon2id_opslimit", str(MAX_OPSLIMIT + 1), "outside the accepted range"),
    ("argon2id_opslimit", "4294967296", "outside the accepted range"),  # past libsodium's own maximum
    ("argon2id_opslimit", "-1", "outside the accepted range"),
    ("argon2id_opslimit", '"3"', "must be an integer, not str"),
    ("argon2id_opslimit", "3.0", "must be an integer, not float"),
    ("argon2id_opslimit", "true", "must be an integer, not bool"),
    ("argon2id_opslimit", "[3]", "must be an integer, not list"),
    ("argon2id_memlimit", "4398046510080", "outside the accepted range"),  # 4 TB, libsodium's maximum
    ("argon2id_memlimit", str(MAX_MEMLIMIT + 1), "outside the accepted range"),
    ("argon2id_memlimit", "1024", "outside the accepted range"),  # below libsodium's minimum
    ("argon2id_memlimit", "9223372036854775807", "outside the accepted range"),
    ("argon2id_memlimit", "{ a = 1 }", "must be an integer, not dict"),
]


@pytest.mark.parametrize(("field", "value", "reason"), TAMPERED_COSTS)
def test_tampered_argon2_costs_are_refused_before_the_kdf(no_kdf, field: str, value: str, reason: str) -> None:
    asked = []
    with pytest.raises(KeyMaterialError, match=f"{field}.*{reason}") as caught:
        identity_from_text(key_text(**{field: value}), lambda: asked.append(1) or b"pw", "victim.key")
    assert type(caught.value) is KeyMaterialError  # not a wrong-passphrase error: the file is bad
    assert "restore it from your backup" in caught.value.hint
    assert asked == []  # refused before anyone is asked for a passphrase


def test_cost_limits_are_within_libsodium_and_above_the_default() -> None:
    from nacl.pwhash import argon2id

    assert argon2id.OPSLIMIT_SENSITIVE <= MAX_OPSLIMIT <= argon2id.OPSLIMIT_MAX
    assert argon2id.MEMLIMIT_SENSITIVE <= MAX_MEMLIMIT <= argon2id.MEMLIMIT_MAX
    with pytest.raises(ValueError, match="outside"):
        keyfile.KdfParams(MAX_OPSLIMIT + 1, argon2id.MEMLIMIT_MIN)  # we never write what we would refuse to read


DAMAGED_FIELDS = [
    ({"salt": "12"}, "field 'salt' must be a base64 string"),
    ({"nonce": '"AAAA"'}, "field 'nonce' is damaged"),
    ({"ciphertext": ""}, "missing field 'ciphertext'"),
    ({"argon2id_memlimit": ""}, "missing field 'argon2id_memlimit'"),
    ({"protection": '["argon2id-xchacha20poly1305"]'}, "unknown protection"),
    ({"protection": '"rot13"'}, "unknown protection"),
    ({"name": "7"}, "field 'name' must be a string, not int"),
    ({"key_id": ""}, "missing field 'key_id'"),
    ({"sign_ed25519": "[1, 2]"}, "field 'sign_ed25519' must be a string"),
    ({"format": '"secure-oneshot-private-identity/v1"\nextra = "x"'}, "unknown field 'extra'"),
]


@pytest.mark.parametrize(("replace", "reason"), DAMAGED_FIELDS)
def test_damaged_key_file_fields_are_clear_key_errors(no_kdf, replace: dict[str, str], reason: str) -> None:
    with pytest.raises(KeyMaterialError, match=reason) as caught:
        identity_from_text(key_text(**replace), b"pw", "victim.key")
    assert type(caught.value) is KeyMaterialError and caught.value.hint


def test_unprotected_key_file_may_not_carry_kdf_fields(no_kdf) -> None:
    text = key_text(None).replace('protection = "none-INSECURE"', 'protection = "none-INSECURE"\nargon2id_opslimit = 1')
    with pytest.raises(KeyMaterialError, match="unknown field 'argon2id_opslimit'"):
        identity_from_text(text, None, "victim.key")


def test_cli_with_tampered_costs_is_exit_4_one_line(site: Site, capsys, no_kdf) -> None:
    key = site.key("site")
    text = key.read_text().replace(f"argon2id_memlimit = {FAST_INSECURE_KDF.memlimit}", "argon2id_memlimit = 4398046510080")
    assert text != key.read_text()
    key.write_text(text)
    message, hint = cli_error(
        capsys, ["seal", site.model, "--key", key, "--to", site.pub("server"), "--out", "x.sob"], KeyMaterialError
    )
    assert message == f"{key}: argon2id_memlimit = 4398046510080 is outside the accepted range 8192..{MAX_MEMLIMIT}"
    assert "restore it from your backup" in hint


@POSIX_ONLY
def test_key_path_that_is_a_fifo_directory_or_huge_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would hang forever
    huge = tmp_path / "huge.key"
    huge.write_bytes(b"#" * (MAX_KEY_FILE_BYTES + 1))
    huge.chmod(0o600)
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe" * 10)
    binary.chmod(0o600)
    for path, reason in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                         (huge, f"larger than {MAX_KEY_FILE_BYTES} bytes"), (binary, "not UTF-8")):
        with pytest.raises(KeyMaterialError, match=reason):
            load_identity(path, b"pw")


# --------------------------------------------------------------------------- 3. ledger paths with URI characters


HOSTILE_LEDGER_NAMES = ["x?mode=memory", "a#b.db", "100%25 sure.db", "sp ace?mode=ro&cache=shared#frag%.db", "file:z?mode=memory"]


@pytest.mark.parametrize("name", HOSTILE_LEDGER_NAMES)
def test_ledger_path_is_a_file_name_not_uri_parameters(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    ledger = ReplayLedger(path)
    ledger.record("ab" * 16, "sender", "2026-11-26T12:00:00Z", "00" * 32)
    ledger.close()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # that very file, and nothing else
    again = ReplayLedger(path)
    with pytest.raises(ReplayError):
        again.record("ab" * 16, "sender", "2026-11-26T12:00:00Z", "00" * 32)
    again.close()
    with pytest.raises(ReplayError, match="already accepted"):
        ReplayLedger.read_only(path).check("ab" * 16)


def test_read_only_ledger_creates_nothing_and_refuses_a_non_ledger(tmp_path: Path) -> None:
    ReplayLedger.read_only(tmp_path / "missing?mode=rwc.db").check("cd" * 16)
    assert list(tmp_path.iterdir()) == []
    not_a_ledger = tmp_path / "notes.txt"
    not_a_ledger.write_text("hello")
    with pytest.raises(ResourceError, match="cannot read replay ledger"):
        ReplayLedger.read_only(not_a_ledger)


def test_cli_replay_is_refused_through_a_ledger_named_like_a_uri(site: Site, bundle: Path, capsys) -> None:
    ledger = "x?mode=memory"
    common = ["--key", site.key("server"), "--trust", site.trust, "--ledger", ledger]
    code, _, err = run_cli(capsys, "open", bundle, *common, "--out", "first.safetensors")
    assert code == 0, err
    assert (site.root / ledger).is_file()
    for argv in (["verify", bundle, *common], ["open", bundle, *common, "--out", "second.safetensors"]):
        message, _ = cli_error(capsys, argv, ReplayError)
        assert "already accepted" in message
    assert not (site.root / "second.safetensors").exists()


# --------------------------------------------------------------------------- 4. private key file modes


@POSIX_ONLY
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601, 0o666])
def test_private_key_accessible_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    private, _ = save_identity(Identity.generate("site"), tmp_path, b"pw", kdf=FAST_INSECURE_KDF)
    private.chmod(mode)
    asked = []
    for load in (lambda: load_identity(private, lambda: asked.append(1) or b"pw"), lambda: is_protected(private)):
        with pytest.raises(KeyMaterialError, match=f"private key file {private} has mode {mode:04o}") as caught:
            load()
        assert caught.value.hint == f"chmod 600 {private}"
    assert asked == []  # refused before the passphrase is asked for


@POSIX_ONLY
def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    identity = Identity.generate("site")
    private, _ = save_identity(identity, tmp_path, b"pw", kdf=FAST_INSECURE_KDF)
    for mode in (0o600, 0o400):
        private.chmod(mode)
        assert load_identity(private, b"pw").key_id == identity.key_id


@POSIX_ONLY
def test_mode_is_judged_on_the_file_a_symlink_names(tmp_path: Path) -> None:
    identity = Identity.generate("site")
    private, _ = save_identity(identity, tmp_path / "real", b"pw", kdf=FAST_INSECURE_KDF)
    link = tmp_path / "link.key"
    link.symlink_to(private)  # a symlink's own bits are always 0777 and mean nothing
    assert load_identity(link, b"pw").key_id == identity.key_id
    private.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="has mode 0644"):
        load_identity(link, b"pw")


@POSIX_ONLY
def test_cli_refuses_a_readable_key_with_the_chmod_hint(site: Site, capsys) -> None:
    key = site.root / "keys" / "my site.key"
    site.key("site").rename(key)
    key.chmod(0o644)
    message, hint = cli_error(capsys, ["seal", site.model, "--key", key, "--to", site.pub("server"), "--out", "x.sob"],
                              KeyMaterialError)
    assert message == f"private key file {key} has mode 0644: group or other users can access it"
    assert hint == f"chmod 600 {shlex.quote(str(key))}"


def test_pub_file_given_as_key_still_says_so(site: Site) -> None:
    with pytest.raises(KeyMaterialError, match="not a private key file") as caught:
        load_identity(site.pub("site"), b"pw")  # 0644, but the useful message is that it is the wrong file
    assert ".key file" in caught.value.hint


# --------------------------------------------------------------------------- 5. stale temporaries


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def temporary(folder: Path, target: str, pid: int, content: bytes = b"PLAINTEXT weights") -> Path:
    path = folder / f".{target}.{pid}.{os.urandom(4).hex()}.tmp"
    path.write_bytes(content)
    return path


@POSIX_ONLY
def test_stale_temporary_of_a_dead_writer_is_removed_on_the_next_write(tmp_path: Path) -> None:
    stale = temporary(tmp_path, "opened.safetensors", dead_pid())
    atomic_write_bytes(tmp_path / "opened.safetensors", b"new")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["opened.safetensors"]


@POSIX_ONLY
def test_sweep_keeps_what_is_not_a_dead_writers_temporary_of_that_target(tmp_path: Path) -> None:
    pid = dead_pid()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious"
    victim.write_bytes(b"keep me")
    live = temporary(tmp_path, "out.bin", os.getpid())  # a writer that is still running (us)
    other_target = temporary(tmp_path, "other.bin", pid)  # another file's temporary
    longer_name = temporary(tmp_path, "out.bin.bak", pid)  # a target whose name merely starts the same
    near_miss = tmp_path / f".out.bin.{pid}.ABCDEF01.tmp"  # upper-case hex: not our pattern
    near_miss.write_bytes(b"x")
    suffixed = tmp_path / f".out.bin.{pid}.abcdef01.tmp.keep"
    suffixed.write_bytes(b"x")
    link = tmp_path / f".out.bin.{pid}.0123abcd.tmp"
    link.symlink_to(victim)
    folder = tmp_path / f".out.bin.{pid}.4567cdef.tmp"
    folder.mkdir()
    assert sweep_stale_temporaries(tmp_path / "out.bin") == []
    for kept in (live, other_target, longer_name, near_miss, suffixed, folder):
        assert kept.exists(), kept.name
    assert link.is_symlink() and victim.read_bytes() == b"keep me"


@POSIX_ONLY
@pytest.mark.skipif(os.name == "posix" and os.geteuid() != 0, reason="needs root to create another user's file")
def test_sweep_keeps_another_users_temporary(tmp_path: Path) -> None:
    theirs = temporary(tmp_path, "out.bin", dead_pid())
    os.chown(theirs, 54321, 54321)
    atomic_write_bytes(tmp_path / "out.bin", b"new")
    assert theirs.exists()


@POSIX_ONLY
def test_cli_open_removes_plaintext_left_by_a_killed_open(site: Site, bundle: Path, capsys) -> None:
    stale = temporary(site.root, "opened.safetensors", dead_pid(), b"decrypted weights from a killed run")
    code, _, err = run_cli(capsys, "open", bundle, "--key", site.key("server"), "--trust", site.trust, "--out", "opened.safetensors")
    assert code == 0, err
    assert not stale.exists() and (site.root / "opened.safetensors").is_file()


# --------------------------------------------------------------------------- 6. modes of what keys writes


@POSIX_ONLY
def test_keys_new_writes_0600_in_a_private_folder_even_with_a_permissive_umask(site: Site, capsys) -> None:
    previous = os.umask(0)
    try:
        code, _, err = run_cli(capsys, "keys", "new", "--name", "fresh", "--out", "new/keys", "--insecure-no-passphrase")
    finally:
        os.umask(previous)
    assert code == 0, err
    folder = site.root / "new" / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "fresh.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "fresh.pub").stat().st_mode) == 0o644


@POSIX_ONLY
def test_keys_new_refuses_a_world_writable_folder(site: Site, capsys) -> None:
    shared = site.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    message, hint = cli_error(capsys, ["keys", "new", "--name", "x", "--out", shared, "--insecure-no-passphrase"], ResourceError)
    assert message.startswith(f"refusing to write a private key into {shared} (mode 0777)")
    assert hint.startswith(f"chmod o-w {shared}")
    assert list(shared.iterdir()) == []


@POSIX_ONLY
def test_demo_identities_are_0600(tmp_path: Path) -> None:
    from secure_oneshot.demo import create_identities

    ids, _ = create_identities(tmp_path, ["hospital-1"])
    for name in ids:
        assert stat.S_IMODE((tmp_path / "keys" / f"{name}.key").stat().st_mode) == 0o600


def test_wrong_passphrase_is_still_a_passphrase_error(site: Site) -> None:
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        load_identity(site.key("site"), b"not the passphrase")


def test_a_choice_among_integers_is_reported_not_crashed():
    from secure_oneshot._internal.strict_toml import one_of

    assert one_of((28, 64))(27) == "must be one of 28, 64; got 27"
    assert one_of((28, 64))(64) is None

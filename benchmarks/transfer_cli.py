"""The file-to-file CLI transfer path against ``age`` and ``openssl enc``: wall, CPU and whole-process peak RSS.

Run as ``python benchmarks/transfer.py --cli [--sizes 10,100,1000] [--workdir DIR]``.
This parent imports only the standard library, and each command runs under
GNU ``/usr/bin/time`` when it exists: on Linux a child's ``ru_maxrss`` starts at
the RSS of the process that forked it (a Python parent: ~14 MiB, which would
put a floor under every row), and ``time`` forks from a 1 MiB image.  The
numbers are the command's own ``rusage`` (``wait4``): ``ru_maxrss`` (peak RSS of
the whole process, interpreter and libraries included) and user + system CPU
seconds.  Without ``/usr/bin/time`` the parent reaps the child with
``os.wait4`` itself and the table says so.

``--passes`` adds, in the same rounds, one child that times each pass ``seal``
makes over the payload on its own, on the same file, one thread (CPU seconds per
GB, each pass's minimum over the rounds; payloads of 100 MB or more): reading the file in the seal's 4 MiB
windows, the strict payload scan (layout, BOOL, NaN/Inf), SHA-256,
ChaCha20-Poly1305 in 1 MiB chunks and writing the ciphertext; and, where the
packages are installed, BLAKE3 and AES-256-GCM, which a different format could
use instead.  Their sum is the floor of any seal of this format in this
process, beside ``age -e``'s whole command.

``--repeat N`` runs N interleaved rounds (each command once per round) and
reports each figure's minimum; ``--baseline CHECKOUT`` adds rows for the
secure-oneshot commands of another checkout (``PYTHONPATH``), in the same
rounds.  Children get a private bytecode cache in the work folder.

Per payload size (MB = 10^6 bytes): a safetensors file of float32 values in
[0, 1) (16 tensors; written by a helper child with NumPy), then

* ``secure-oneshot seal`` (strict checks incl. NaN/Inf, SHA-256, ChaCha20-Poly1305, sign),
* ``secure-oneshot verify`` and ``secure-oneshot open --out`` (decrypt, check, publish),
* ``age -e`` / ``age -d`` with an X25519 recipient, if ``age`` is installed,
* ``openssl enc -chacha20`` / ``-d`` (raw cipher, no authentication: the floor).

The keys are unprotected test keys (no Argon2id in the timings).  Files live in
``--workdir`` (default a temporary folder in ``/dev/shm``, so the disk is not
measured) and are removed after each size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 10**6
MiB = 1 << 20

GENERATE = r"""
import json, struct, sys
import numpy as np
path, total = sys.argv[1], int(sys.argv[2])
n = total // 4 // 16
rng = np.random.default_rng(20240601)
header = {f"layers.{i:02d}.weight": {"dtype": "F32", "shape": [n], "data_offsets": [4 * n * i, 4 * n * (i + 1)]} for i in range(16)}
text = json.dumps(header, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for _ in range(16):
        for start in range(0, n, 1 << 22):
            f.write(rng.random(min(1 << 22, n - start), dtype=np.float32).tobytes())
"""


PASSES = r"""
import hashlib, json, os, resource, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from secure_oneshot.bundle import arrays  # NumPy: the scan of a large payload imports it on first use, a start-up cost
from secure_oneshot.bundle.payload_scan import PayloadScanner
from secure_oneshot.bundle.seal import READ_WINDOW
src, sink = sys.argv[1], sys.argv[2]
size = os.path.getsize(src)
CHUNK = 1 << 20

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def windows(work):
    # the seal's pattern: one window buffer reused, each window handed to the pass
    buffer = bytearray(READ_WINDOW)
    with open(src, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                return
            work(memoryview(buffer)[:n])

def chunks(work):
    def each(view):
        for start in range(0, len(view), CHUNK):
            work(view[start:start + CHUNK])
    return each

def encrypt(cipher):
    out = bytearray(CHUNK + 16)
    nonce = [0]
    def run(view):
        nonce[0] += 1
        cipher.encrypt_into(nonce[0].to_bytes(12, "big"), view, None, memoryview(out)[:len(view) + 16])
    return run

def timed(make):
    windows(lambda v: None)   # the file's pages warm for every pass alike
    start = cpu()
    make()
    return cpu() - start

def scan():
    scanner = PayloadScanner(size)
    windows(scanner.feed)
    scanner.finish()

def digest(factory):
    def run():
        h = factory()
        windows(h.update)
        h.digest()
    return run

def write():
    block = os.urandom(CHUNK + 16)
    with open(sink, "wb", buffering=0) as f:
        for _ in range(-(-size // CHUNK)):
            f.write(block)
    os.unlink(sink)

read_only = timed(lambda: windows(lambda v: None))
result = {"read": read_only}
result["payload scan"] = timed(scan) - read_only
result["SHA-256"] = timed(digest(hashlib.sha256)) - read_only
result["ChaCha20-Poly1305"] = timed(lambda: windows(chunks(encrypt(ChaCha20Poly1305(os.urandom(32)))))) - read_only
result["write"] = timed(write)
result["AES-256-GCM"] = timed(lambda: windows(chunks(encrypt(AESGCM(os.urandom(32)))))) - read_only
try:
    import blake3
    result["BLAKE3"] = timed(digest(blake3.blake3)) - read_only
except ImportError:
    pass
print(json.dumps(result))
"""
SEAL_PASSES = ("read", "payload scan", "SHA-256", "ChaCha20-Poly1305", "write")
PASSES_MIN_MB = 100
"""Smaller payloads are not timed pass by pass: a pass over 10 MB takes a few ms, near rusage's resolution."""


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd``; its wall seconds, CPU seconds and peak RSS (MiB), from its own rusage."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        wrapped = [TIME, "-o", report.name, "-f", "%M %U %S", *cmd] if TIME else cmd
        start = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {stderr[-2000:]}")
        if TIME:
            kib, user, system = report.read().split()[-3:]
            return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_mib": int(kib) / 1024}
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "secure_oneshot", *args]


def make_keys(work: Path, env: dict[str, str]) -> None:
    for name in ("site", "server"):
        subprocess.run(cli("keys", "new", "--name", name, "--out", str(work / "keys"), "--insecure-no-passphrase"),
                       check=True, env=env, capture_output=True)
    subprocess.run(cli("keys", "trust", "add", str(work / "keys" / "site.pub"), "--role", "sender", "--trust", str(work / "trust.toml")),
                   check=True, env=env, capture_output=True)
    if shutil.which("age-keygen"):
        subprocess.run(["age-keygen", "-o", str(work / "age.key")], check=True, capture_output=True)


def _keep_min(rows: dict[str, dict[str, float]], name: str, result: dict[str, float]) -> None:
    """Each figure's minimum over the repeats (CPU, wall and RSS taken separately)."""
    rows[name] = {k: min(v, rows[name][k]) for k, v in result.items()} if name in rows else result


def measure_passes(src: Path, work: Path, env: dict[str, str]) -> dict[str, float]:
    """CPU seconds of each pass of the seal over ``src``, alone, in one child process (see ``--passes``)."""
    done = subprocess.run([sys.executable, "-c", PASSES, str(src), str(work / "passes.out")], env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def measure_size(work: Path, size_mb: int, env: dict[str, str], have_age: bool, repeat: int = 1,
                 baseline: dict[str, str] | None = None, passes: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Every command ``repeat`` times, interleaved (one round runs each command once), minimum of each figure.

    With ``baseline`` (an environment whose PYTHONPATH points at another checkout) the secure-oneshot
    commands also run with that code, in the same rounds, on the same files.  With ``passes`` (a dict,
    filled here) each round also times the seal's passes alone; each pass's minimum is kept.
    """
    src, bundle, out = work / "in.safetensors", work / "b.sob", work / "out.safetensors"
    subprocess.run([sys.executable, "-c", GENERATE, str(src), str(size_mb * MB)], check=True)
    keys, trust = work / "keys", str(work / "trust.toml")
    common = ["--key", str(keys / "server.key"), "--trust", trust]
    versions = {"": env, " (baseline)": baseline} if baseline else {"": env}
    key, iv = "11" * 32, "22" * 16
    rows: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for suffix, version_env in versions.items():
            _keep_min(rows, f"secure-oneshot seal{suffix}", run(cli("seal", str(src), "--key", str(keys / "site.key"),
                                                                   "--to", str(keys / "server.pub"), "--out", str(bundle)), version_env))
            _keep_min(rows, f"secure-oneshot verify{suffix}", run(cli("verify", str(bundle), *common), version_env))
            _keep_min(rows, f"secure-oneshot open{suffix}", run(cli("open", str(bundle), *common, "--out", str(out)), version_env))
            if out.read_bytes() != src.read_bytes():
                raise SystemExit("the opened payload differs from the sealed file")
            for f in (bundle, out):
                f.unlink()
        if have_age:
            recipient = next(line.split(": ")[1] for line in (work / "age.key").read_text().splitlines() if "public key" in line)
            _keep_min(rows, "age -e", run(["age", "-r", recipient.strip(), "-o", str(bundle), str(src)]))
            _keep_min(rows, "age -d", run(["age", "-d", "-i", str(work / "age.key"), "-o", str(out), str(bundle)]))
            for f in (bundle, out):
                f.unlink()
        _keep_min(rows, "openssl enc -chacha20", run(["openssl", "enc", "-chacha20", "-K", key, "-iv", iv, "-in", str(src), "-out", str(bundle)]))
        _keep_min(rows, "openssl enc -d -chacha20", run(["openssl", "enc", "-d", "-chacha20", "-K", key, "-iv", iv, "-in", str(bundle), "-out", str(out)]))
        for f in (bundle, out):
            f.unlink()
        if passes is not None:
            for name, seconds in measure_passes(src, work, env).items():
                passes[name] = min(seconds, passes.get(name, seconds))
    src.unlink()
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transfer.py --cli", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="payload sizes in MB (10^6 bytes), comma-separated")
    parser.add_argument("--workdir", type=Path, help="folder for the files (default: a temporary one in /dev/shm)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every command, interleaved; the minimum is reported")
    parser.add_argument("--baseline", metavar="CHECKOUT", type=Path,
                        help="also run the secure-oneshot commands from this checkout (PYTHONPATH), in the same rounds")
    parser.add_argument("--passes", action="store_true",
                        help="also time each pass of the seal alone (read, scan, SHA-256, AEAD, write; BLAKE3 and AES-GCM if installed)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SECURE_ONESHOT_PASSPHRASE", None)
    have_age = shutil.which("age") is not None and shutil.which("age-keygen") is not None
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="transfer-cli-", dir=args.workdir or shm) as tmp:
        work = Path(tmp)
        # A private bytecode cache, as an installed package has (the environment may set PYTHONDONTWRITEBYTECODE).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        baseline = {**env, "PYTHONPATH": str(args.baseline.resolve())} if args.baseline else None
        make_keys(work, env)
        print(f"age: {shutil.which('age') or 'absent'}; openssl: {shutil.which('openssl') or 'absent'}; "
              f"rusage via {TIME or 'os.wait4 from the Python parent (RSS floor ~14 MiB)'}")
        print("| payload | command | wall s | CPU s | CPU s per GB | peak RSS MiB |")
        print("| ---: | --- | ---: | ---: | ---: | ---: |")
        passes: dict[int, dict[str, float]] = {}
        for size in sizes:
            for name, r in measure_size(work, size, env, have_age, args.repeat, baseline,
                                        passes.setdefault(size, {}) if args.passes and size >= PASSES_MIN_MB else None).items():
                print(f"| {size} MB | `{name}` | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['cpu_s'] / (size / 1000):.2f} "
                      f"| {r['peak_rss_mib']:.1f} |", flush=True)
        if args.passes:
            print(f"\nEach pass of the seal alone (one process, one thread, minimum over the rounds; payloads of at least "
                  f"{PASSES_MIN_MB} MB), CPU s per GB:\n")
            print("| payload | pass | CPU s per GB | in this format's seal |")
            print("| ---: | --- | ---: | --- |")
            for size, measured in passes.items():
                for name, seconds in measured.items():
                    print(f"| {size} MB | {name} | {seconds / (size / 1000):.2f} | {'yes' if name in SEAL_PASSES else 'no'} |")
                floor = sum(measured[name] for name in SEAL_PASSES) / (size / 1000)
                print(f"| {size} MB | **sum of the seal's passes** | **{floor:.2f}** | |")
    return 0

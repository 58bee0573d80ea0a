"""Atomic file writes: temp file in the same directory, fsync, rename, fsync dir.

A crash or an exception at any point leaves either the old file or the new one,
never a partial file (DESIGN.md invariant 4).  Temp files are created with the
final mode from the start, so a private key is never briefly world-readable.

A process killed mid-write (SIGKILL, power loss) cannot remove its temporary,
which may hold plaintext (a decrypted payload).  The next write to the same
target sweeps such leftovers: only files named exactly like this module's
temporaries for that target, regular files (never a symlink), owned by the
current user, whose writer process no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ResourceError, SecureOneshotError

__all__ = ["atomic_writer", "atomic_write_bytes", "fsync_dir", "sweep_stale_temporaries", "temporary_beside"]


def temporary_beside(final: str | os.PathLike[str]) -> Path:
    """A fresh temporary path in ``final``'s folder, named so that :func:`sweep_stale_temporaries` recognises it."""
    target = Path(final)
    return target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def _process_is_gone(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0, ...) would address our own process group
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is delivered
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # another user's live process, or not a pid we can reason about: keep
    return False


def sweep_stale_temporaries(final: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of ``final`` left by writers that died (see the module docstring).

    Returns:
        The paths removed.  Anything that cannot be checked or removed is left alone.
    """
    if os.name != "posix":
        return []  # os.kill(pid, 0) would terminate the process on Windows
    target = Path(final)
    directory = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([0-9]{{1,10}})\.[0-9a-f]{{8}}\.tmp")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)  # lstat: a symlink is never followed or removed
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or not _process_is_gone(int(match[1])):
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a directory entry (a new or renamed file) durable, not only the file's content."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = 0o644, overwrite: bool = True,
                  readable: bool = False) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces ``path`` only if the block succeeds.

    Args:
        path: final destination.
        mode: permission bits of the new file (e.g. ``0o600`` for secrets).
        overwrite: when False, refuse to replace an existing file.
        readable: open the temporary for reading too (e.g. to map what was written before publishing it).

    Raises:
        ResourceError: the folder is missing, not writable, or ``path`` exists and
            ``overwrite`` is False.
    """
    final = Path(path)
    if not overwrite and final.exists():
        raise ResourceError(f"{final} already exists", hint="choose another path or pass --force to replace it")
    directory = final.parent if str(final.parent) else Path(".")
    sweep_stale_temporaries(final)
    tmp = directory / temporary_beside(final).name
    try:
        fd = os.open(tmp, (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise ResourceError(f"cannot write to {directory}: {e.strerror}", hint="check the folder exists and is writable") from e
    try:
        with os.fdopen(fd, "w+b" if readable else "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # umask may have narrowed it; never widened beyond `mode`
        if not overwrite and final.exists():
            raise ResourceError(f"{final} appeared while writing", hint="choose another path")
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, SecureOneshotError):
            raise ResourceError(f"writing {final} failed: {e.strerror or e}", hint="check free disk space") from e
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode=mode, overwrite=overwrite) as f:
        f.write(data)

"""File helpers: the one home of dpocache's cache directory, content hashes and crash-safe writes.

Contract:
- :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` write a unique
  temporary file next to the target, fsync it, rename it over the target and fsync the directory: a
  crash leaves the old file or the new one, never a torn one.
- :func:`disk_errors` turns "no space left on device" / "disk quota exceeded" into :class:`DiskFullError`,
  one line that names the path, the space free and (when known) the space needed. Whatever was being
  written is removed by the caller's cleanup (every writer here removes its temporary file on failure).
- :func:`synced_new_file` is for writers that produce a file themselves (a Parquet writer, a copy): it
  yields the open file, fsyncs it when the block ends and removes it on any failure;
  :func:`copy_file_synced` copies with it; :func:`replace_synced` renames into place durably.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
_CHUNK = 16 * 1024 * 1024
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """A write failed because the file system is full (or over quota); the message names the path."""


def dpocache_home() -> Path:
    """``$DPOCACHE_HOME`` or ``~/.cache/dpocache``: converted models, default stores, hash cache."""
    return Path(os.environ.get("DPOCACHE_HOME") or Path.home() / ".cache" / "dpocache")


def file_sha256(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mib(n: int | None) -> str:
    """A byte count for people: KiB below 1 MiB, GiB from 1 GiB, else MiB."""
    if n is None:
        return "unknown"
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s or u == "KiB")
    return f"{n / scale:,.1f} {unit}"


def is_disk_full(exc: BaseException) -> bool:
    """An OSError (or a library error wrapping one, such as safetensors') that means the disk is full."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextmanager
def disk_errors(path: str | Path, *, needed: int | None = None, what: str = "writing"):
    """Re-raise a full-disk failure inside the block as :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:  # noqa: BLE001 - only full-disk failures are translated
        if not is_disk_full(exc):
            raise
        need = f"; about {_mib(needed)} needed" if needed else ""
        raise DiskFullError(f"{path}: no space left on device while {what} ({_mib(free_bytes(path))} free{need}); "
                            "free some space or choose another directory, then run the same command again "
                            "(nothing half-written was kept)") from None


def temp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary file, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    tmp = temp_name(path)
    with disk_errors(path, needed=len(data)):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload, *, indent: int | None = 2) -> None:
    """JSON (non-JSON values as ``str``) with a final newline, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=indent, default=str) + "\n")


def remove_tree(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def synced_new_file(path: str | Path, *, name: str | Path | None = None, needed: int | None = None,
                    what: str = "writing"):
    """Open ``path`` (a new, temporary name) for binary writing and yield the file. When the block ends the
    file is flushed and fsynced; on any failure it is closed and removed. A full disk becomes
    :class:`DiskFullError` naming ``name`` (default ``path``) and the ``needed`` bytes."""
    path = Path(path)
    with disk_errors(name or path, needed=needed, what=what):
        try:
            with open(path, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def copy_file_synced(source: str | Path, dest: str | Path, *, name: str | Path | None = None) -> None:
    """Copy ``source`` to ``dest`` (a new, temporary name) and fsync it; nothing is left behind on failure."""
    with open(source, "rb") as src, synced_new_file(dest, name=name, needed=os.fstat(src.fileno()).st_size,
                                                    what="copying") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def replace_synced(source: str | Path, dest: str | Path) -> None:
    """Rename ``source`` over ``dest`` and make the rename durable (directory fsync)."""
    os.replace(source, dest)
    fsync_dir(Path(dest).parent)

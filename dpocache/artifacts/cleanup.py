"""Writer registration and orphan cleanup.

Every process that opens a store for writing registers as a *writer*: it creates
``.writers/<writer-id>.lock`` and holds an exclusive ``flock`` on it for as long as it lives (the kernel
drops the lock when the process dies, even by ``kill -9``). Its temporary shard files are named
``shards/.tmp-<writer-id>-<shard>.parquet``. A temporary file is an orphan, and is removed on the next
open for writing, only when its writer's lock can be taken, i.e. that writer is gone. Shard files that
the manifest does not list are orphans too (a crash between rename and manifest update): shards are
renamed into place under the store lock, so such a file never belongs to a live writer.
"""

from __future__ import annotations

import fcntl
import re
import time
import uuid
from pathlib import Path

from dpocache.artifacts.manifest import Manifest
from dpocache.files import TMP_PREFIX, disk_errors

WRITERS_DIR = ".writers"
SHARD_DIR = "shards"
LIST_DIR = "lists"
_TMP_SHARD = re.compile(r"^\.tmp-([0-9a-f]{32})-")
UNKNOWN_TMP_MAX_AGE_S = 7 * 86400.0  # temporaries in no known format (older dpocache): removed after a week


class WriterLock:
    """This process's registration as a writer of one store (released by :meth:`release` or at exit)."""

    def __init__(self, root: Path):
        self.id = uuid.uuid4().hex
        self.path = root / WRITERS_DIR / f"{self.id}.lock"
        with disk_errors(self.path, what="registering a writer"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def temp_shard_name(self, final_name: str) -> str:
        return f"{TMP_PREFIX}{self.id}-{final_name}"

    def release(self) -> None:
        if not self._fh.closed:
            self.path.unlink(missing_ok=True)
            self._fh.close()


def _writer_gone(root: Path, writer_id: str) -> bool:
    """True when no live process holds the writer lock ``writer_id`` (its lock file is then removed)."""
    path = root / WRITERS_DIR / f"{writer_id}.lock"
    try:
        fh = open(path, "r+")
    except FileNotFoundError:
        return True
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        return True


def _is_stale_temp(root: Path, path: Path, own_id: str | None) -> bool:
    match = _TMP_SHARD.match(path.name)
    if match:
        return match.group(1) != own_id and _writer_gone(root, match.group(1))
    try:
        return time.time() - path.stat().st_mtime > UNKNOWN_TMP_MAX_AGE_S
    except FileNotFoundError:
        return False


def clean_orphans(root: Path, manifest: Manifest, own_id: str | None = None) -> list[Path]:
    """Remove orphans (see module docstring). The caller holds the store lock. Returns what was removed."""
    removed: list[Path] = []

    def drop(path: Path) -> None:
        path.unlink(missing_ok=True)
        removed.append(path)

    listed = {entry["path"] for entry in manifest.shards} | {entry["path"] for entry in manifest.lists.values()}
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in shard_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                if _is_stale_temp(root, path, own_id):
                    drop(path)
            elif path.suffix == ".parquet" and f"{SHARD_DIR}/{path.name}" not in listed:
                drop(path)
    list_dir = root / LIST_DIR
    if list_dir.is_dir():  # list files and their temporaries are only written under the store lock
        for path in list_dir.iterdir():
            if path.name.startswith(TMP_PREFIX) or (path.suffix == ".json" and f"{LIST_DIR}/{path.name}" not in listed):
                drop(path)
    for path in root.glob(f"{TMP_PREFIX}*"):  # manifest temporaries, also written under the lock
        drop(path)
    writers = root / WRITERS_DIR
    if writers.is_dir():
        for path in writers.glob("*.lock"):
            if path.stem != own_id:
                _writer_gone(root, path.stem)
    return removed


def orphan_files(root: Path, manifest: Manifest) -> list[str]:
    """Relative paths of files in ``shards/`` and ``lists/`` that the manifest does not list (read-only)."""
    listed = {entry["path"] for entry in manifest.shards} | {entry["path"] for entry in manifest.lists.values()}
    out = []
    for sub in (SHARD_DIR, LIST_DIR):
        if (root / sub).is_dir():
            out += [f"{sub}/{p.name}" for p in sorted((root / sub).iterdir()) if f"{sub}/{p.name}" not in listed]
    return out


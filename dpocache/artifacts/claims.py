"""Chunk claims: several writers of one store share the work of stage one without any assignment.

Contract:
- Before scoring a chunk, a writer claims it: it creates ``.claims/<key>.json`` (the chunk's key, a digest
  of its example hashes) with ``O_CREAT | O_EXCL``, so at most one writer holds a claim. The file holds the
  writer's pid, host, writer id and start time; its modification time is the heartbeat, refreshed every
  ``heartbeat_s`` seconds by a background thread while the claim is held.
- A claim is **stale** when its writer's pid is not running on this host (or is this very process under
  another writer id), or when its heartbeat is older than ``stale_s`` (writers on other hosts, a pid reused
  on this host, an unreadable file). A stale claim is taken over under the store lock, re-checked there, so
  two writers never both take one over.
- A claim is released (its file removed) once the chunk's shard is committed, or when its writer gives the
  chunk up (an error, a preemption). Claims protect work, not correctness: rows scored twice after a wrongly
  judged stale claim are equal, which the store accepts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from dpocache.artifacts.manifest import pid_alive, store_lock

CLAIMS_DIR = ".claims"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
_LIVE_WRITERS: set[str] = set()  # writer ids of this process's open Claims


def _read(path: Path) -> tuple[dict | None, float | None]:
    """(content or None when unreadable, mtime or None when the file is gone)."""
    try:
        mtime = path.stat().st_mtime
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, mtime
    return (data if isinstance(data, dict) else None), mtime


class Claims:
    """This writer's claims on one store (a context manager: the heartbeat runs inside, every claim still
    held is released on exit)."""

    def __init__(self, root, *, heartbeat_s: float = HEARTBEAT_SECONDS, stale_s: float = STALE_SECONDS):
        self.root = Path(root)
        self.dir = self.root / CLAIMS_DIR
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    # -- claiming -----------------------------------------------------------------------------
    def claim(self, key: str) -> bool:
        """Take the claim on ``key``: True when this writer now holds it, False when a live writer does."""
        if key in self._held:
            return True
        path = self.path(key)
        if self._create(path, key):
            return True
        data, mtime = _read(path)
        if mtime is None:  # released meanwhile
            return self._create(path, key)
        if not self.is_stale(data, mtime):
            return False
        with store_lock(self.root):  # take over: re-check under the lock, then remove it
            again, again_mtime = _read(path)
            if again_mtime is not None:
                if again != data or not self.is_stale(again, again_mtime):
                    return False
                path.unlink(missing_ok=True)
        return self._create(path, key)

    def _create(self, path: Path, key: str) -> bool:
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            json.dump({"writer": self.id, "pid": os.getpid(), "host": self.host, "started": time.time()}, fh)
        with self._lock:
            self._held.add(key)
        return True

    def is_stale(self, data: dict | None, mtime: float) -> bool:
        if time.time() - mtime > self.stale_s:
            return True
        if data is None or data.get("host") != self.host or not isinstance(data.get("pid"), int):
            return False  # being written, or another host's: only the heartbeat tells
        if data["pid"] == os.getpid():
            return data.get("writer") not in _LIVE_WRITERS
        return not pid_alive(data["pid"])

    def holder(self, key: str) -> dict | None:
        """The content of the claim on ``key`` (None when nobody holds it)."""
        data, mtime = _read(self.path(key))
        return data if mtime is not None else None

    def holds(self, key: str) -> bool:
        """Does this writer still hold ``key`` (not taken over by another writer)?"""
        data = self.holder(key)
        return key in self._held and data is not None and data.get("writer") == self.id

    def release(self, key: str) -> None:
        with self._lock:
            held = key in self._held
            self._held.discard(key)
        if held:
            data = self.holder(key)
            if data is None or data.get("writer") == self.id:
                self.path(key).unlink(missing_ok=True)

    def sweep(self) -> list[str]:
        """Remove every stale claim (left by dead writers); returns their keys."""
        removed = []
        if not self.dir.is_dir():
            return removed
        for path in self.dir.glob("*.json"):
            data, mtime = _read(path)
            if mtime is not None and self.is_stale(data, mtime):
                with store_lock(self.root):
                    again, again_mtime = _read(path)
                    if again_mtime is not None and again == data and self.is_stale(again, again_mtime):
                        path.unlink(missing_ok=True)
                        removed.append(path.stem)
        return removed

    # -- heartbeat ----------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                keys = list(self._held)
            for key in keys:
                data = self.holder(key)
                if data is not None and data.get("writer") == self.id:
                    try:
                        os.utime(self.path(key))
                    except FileNotFoundError:
                        pass

    def __enter__(self) -> "Claims":
        _LIVE_WRITERS.add(self.id)
        self._thread = threading.Thread(target=self._beat, name="dpocache-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for key in list(self._held):
            self.release(key)
        _LIVE_WRITERS.discard(self.id)

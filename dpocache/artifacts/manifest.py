"""The store manifest: format, identity, shards and named lists; atomic writes; path safety."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

STORE_FORMAT = "dpocache-reference-store"
STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"


class StoreError(Exception):
    """A store problem; the message names the file and the defect."""


class IdentityMismatchError(StoreError):
    """The store was scored by another reference (weights, tokenizer, template, length, ...)."""


@dataclass
class Manifest:
    identity: dict
    versions: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)  # {"path", "rows", "bytes", "sha256"}
    lists: dict[str, dict] = field(default_factory=dict)  # name -> {"path", "count", "sha256"}

    def to_json(self) -> dict:
        return {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, "identity": self.identity,
                "versions": self.versions, "shards": self.shards, "lists": self.lists}


def safe_relpath(root: Path, rel: str, *, what: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` and symlinks leading outside."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise StoreError(f"{root / MANIFEST}: {what} path {rel!r} points outside the store")
    full = (root / pure).resolve()
    if not full.is_relative_to(root.resolve()):
        raise StoreError(f"{root / MANIFEST}: {what} path {rel!r} resolves outside the store")
    return root / pure


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(f"{path}: no manifest; {root} is not a dpocache store (or its first shard never "
                         "completed)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: torn or corrupt manifest (not valid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a dpocache store manifest")
    version = data.get("format_version")
    if version != STORE_FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {version} is not supported by this dpocache "
                         f"(expects {STORE_FORMAT_VERSION})")
    try:
        manifest = Manifest(dict(data["identity"]), dict(data.get("versions", {})), list(data["shards"]),
                            dict(data.get("lists", {})))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{path}: malformed manifest ({exc})") from None
    for shard in manifest.shards:
        if not isinstance(shard, dict) or not {"path", "rows", "sha256"} <= set(shard):
            raise StoreError(f"{path}: malformed shard entry {shard!r}")
        safe_relpath(root, shard["path"], what="shard")
    for name, entry in manifest.lists.items():
        if not isinstance(entry, dict) or "path" not in entry:
            raise StoreError(f"{path}: malformed list entry {name!r}")
        safe_relpath(root, entry["path"], what="list")
    return manifest


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Is a process with this id running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


@contextmanager
def store_lock(root: Path):
    """Exclusive lock around read-modify-write of the manifest (works across processes)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""The store manifest: format, identity, shards and named lists; atomic writes; path safety; locking."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from dpocache.files import atomic_write_bytes, disk_errors, is_disk_full

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
    lists: dict[str, dict] = field(default_factory=dict)  # name -> {"path", "count", "sha256"[, "role", ...]}
    created_at: str | None = None  # UTC, ISO 8601: when the store was created (None: an older store)
    scored_at: str | None = None   # UTC, ISO 8601: when rows were last added

    def to_json(self) -> dict:
        out = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION}
        out.update({k: v for k, v in (("created_at", self.created_at), ("scored_at", self.scored_at)) if v})
        out.update(identity=self.identity, versions=self.versions, shards=self.shards, lists=self.lists)
        return out


def utc_now() -> str:
    """The current time as the manifest records it (UTC, ISO 8601, seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize_identity(identity: dict, *, where: str = "identity") -> dict:
    """A flat, JSON-normalised copy of ``identity`` (so a tuple equals its stored list, etc.)."""
    if not isinstance(identity, dict):
        raise StoreError(f"{where}: the reference identity must be a dict, got {type(identity).__name__}")
    for key, value in identity.items():
        if not isinstance(key, str):
            raise StoreError(f"{where}: identity keys must be strings, got {key!r}")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise StoreError(f"{where}: identity field {key!r} must be a string, number, boolean or null "
                             f"(a flat dict), got {type(value).__name__}")
    try:
        return json.loads(json.dumps(identity, allow_nan=False))
    except ValueError as exc:
        raise StoreError(f"{where}: identity is not JSON-serialisable ({exc})") from None


def identity_diff(stored: dict, requested: dict) -> list[str]:
    """One line per differing field: ``field: store has X, requested Y``."""
    keys = sorted(set(stored) | set(requested))
    missing = object()
    out = []
    for k in keys:
        a, b = stored.get(k, missing), requested.get(k, missing)
        if a != b or type(a) is not type(b) and (isinstance(a, bool) or isinstance(b, bool)):
            show_a = "(absent)" if a is missing else repr(a)
            show_b = "(absent)" if b is missing else repr(b)
            out.append(f"{k}: store has {show_a}, requested {show_b}")
    return out


def safe_relpath(root: Path, rel: object, *, what: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..`` and symlinks leading outside."""
    if not isinstance(rel, str) or not rel:
        raise StoreError(f"{root / MANIFEST}: {what} path {rel!r} is not a relative path string")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel.startswith("~") or ":" in pure.parts[0]:
        raise StoreError(f"{root / MANIFEST}: {what} path {rel!r} points outside the store")
    full = (root / pure).resolve()
    if not full.is_relative_to(root.resolve()):
        raise StoreError(f"{root / MANIFEST}: {what} path {rel!r} resolves outside the store (symlink)")
    return root / pure


def _check_entry(path: Path, root: Path, entry: object, what: str, count_key: str) -> None:
    if not isinstance(entry, dict) or not {"path", count_key, "sha256"} <= set(entry):
        raise StoreError(f"{path}: malformed {what} entry {entry!r} (needs path, {count_key}, sha256)")
    count = entry[count_key]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise StoreError(f"{path}: {what} entry {entry['path']!r} has an invalid {count_key} ({count!r})")
    if "bytes" in entry and (isinstance(entry["bytes"], bool) or not isinstance(entry["bytes"], int)):
        raise StoreError(f"{path}: {what} entry {entry['path']!r} has an invalid bytes ({entry['bytes']!r})")
    if not isinstance(entry["sha256"], str) or len(entry["sha256"]) != 64:
        raise StoreError(f"{path}: {what} entry {entry['path']!r} has an invalid sha256 ({entry['sha256']!r})")
    for key in ("role", "mixture_sha256"):  # optional list fields (older stores have none)
        if key in entry and not isinstance(entry[key], str):
            raise StoreError(f"{path}: {what} entry {entry['path']!r} has an invalid {key} ({entry[key]!r})")
    safe_relpath(root, entry["path"], what=what)


def read_manifest(root: Path) -> Manifest:
    """Parse and validate ``root/manifest.json``; every defect is a :class:`StoreError` naming it."""
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(f"{path}: no manifest; {root} is not a dpocache store (or its first shard never "
                         "completed)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: torn or corrupt manifest (not valid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise StoreError(f"{path}: not a dpocache store manifest (no \"format\": \"{STORE_FORMAT}\")")
    version = data.get("format_version")
    if version != STORE_FORMAT_VERSION:
        raise StoreError(f"{path}: store format version {version!r} is not supported by this dpocache "
                         f"(it reads version {STORE_FORMAT_VERSION})")
    identity, shards, lists = data.get("identity"), data.get("shards"), data.get("lists", {})
    if not isinstance(identity, dict) or not isinstance(shards, list) or not isinstance(lists, dict):
        raise StoreError(f"{path}: malformed manifest (identity must be an object, shards a list, lists an "
                         "object)")
    versions = data.get("versions", {})
    stamps = [data.get(k) if isinstance(data.get(k), str) else None for k in ("created_at", "scored_at")]
    manifest = Manifest(identity, versions if isinstance(versions, dict) else {}, shards, lists, *stamps)
    seen: set[str] = set()
    for entry in shards:
        _check_entry(path, root, entry, "shard", "rows")
        if entry["path"] in seen:
            raise StoreError(f"{path}: shard {entry['path']!r} is listed twice")
        seen.add(entry["path"])
    for entry in lists.values():
        _check_entry(path, root, entry, "list", "count")
    return manifest


def pid_alive(pid: int) -> bool:
    """Is a process with this id running on this host?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (caller holds :func:`store_lock`)."""
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


@contextmanager
def store_lock(root: Path):
    """Exclusive lock around read-modify-write of the manifest (works across processes)."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: exists and is not a directory; a store is a directory")
    with disk_errors(root / LOCK, what="creating the store directory and its lock"):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise StoreError(f"{root}: cannot create the store directory ({exc.strerror or exc})") from None
        fh = open(root / LOCK, "a+")
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

"""The reference store: a directory of Parquet shards plus a manifest, content-addressed by example hash.

Writing: rows are buffered and flushed as shards; each shard is written to a temporary file, fsynced,
then (under the store lock) renamed into place and added to the manifest, which is replaced atomically.
A crash loses at most the shard in flight. Several processes may write one store at once.
Reading: shards are verified on open, rows are fetched by hash, in the requested order.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpocache.artifacts.identity import file_sha256
from dpocache.artifacts.manifest import (MANIFEST, IdentityMismatchError, Manifest, StoreError,
                                         atomic_write_bytes, pid_alive, read_manifest, safe_relpath, store_lock,
                                         write_manifest)
from dpocache.artifacts.shards import (SHARD_DIR, VALUE_COLUMNS, check_shard, publish_shard, read_shard,
                                       validate_row, write_shard_file)

LIST_DIR = "lists"
_LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def identity_diff(stored: dict, requested: dict) -> list[str]:
    keys = sorted(set(stored) | set(requested))
    return [f"{k}: store has {stored.get(k)!r}, requested {requested.get(k)!r}"
            for k in keys if stored.get(k) != requested.get(k)]


class ReferenceStore:
    def __init__(self, root: Path, manifest: Manifest, *, verify: bool):
        self.root = root
        self._manifest = manifest
        self._verify = verify
        self._verified: set[str] = set()
        self._index: dict[str, list[tuple[int, int]]] | None = None

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path, identity: dict, *, versions: dict | None = None) -> "ReferenceStore":
        root = Path(path)
        with store_lock(root):
            if (root / MANIFEST).exists():
                manifest = read_manifest(root)
                diffs = identity_diff(manifest.identity, identity)
                if diffs:
                    raise IdentityMismatchError(
                        f"{root}: the store was scored by another reference; refusing to mix. Differences: "
                        + "; ".join(diffs) + ". Use another --store.")
                if versions:
                    manifest.versions = dict(versions)
                    write_manifest(root, manifest)
            else:
                manifest = Manifest(dict(identity), dict(versions or {}))
                write_manifest(root, manifest)
            _clean_orphans(root, manifest)
        return cls(root, manifest, verify=True)

    @classmethod
    def open(cls, path, *, verify: bool = True) -> "ReferenceStore":
        root = Path(path)
        if not root.is_dir():
            raise StoreError(f"{root}: no such store directory")
        return cls(root, read_manifest(root), verify=verify)

    def refresh(self) -> None:
        self._manifest = read_manifest(self.root)
        self._index = None

    # -- properties ----------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return dict(self._manifest.identity)

    @property
    def versions(self) -> dict:
        return dict(self._manifest.versions)

    @property
    def shards(self) -> list[dict]:
        return list(self._manifest.shards)

    def num_rows(self) -> int:
        return sum(int(s["rows"]) for s in self._manifest.shards)

    def hashes(self) -> set[str]:
        self.refresh()
        return set(self._build_index())

    # -- writing -------------------------------------------------------------------------------
    def writer(self, *, rows_per_shard: int = 1024) -> "ShardWriter":
        return ShardWriter(self, rows_per_shard)

    def _publish(self, rows: list[dict]) -> None:
        tmp, final = write_shard_file(self.root, rows)
        with store_lock(self.root):
            manifest = read_manifest(self.root)
            manifest.shards.append(publish_shard(self.root, tmp, final, len(rows)))
            write_manifest(self.root, manifest)
            self._manifest = manifest
            self._index = None

    def record_list(self, name: str, hashes: list[str]) -> None:
        """Record the ordered example list of a dataset/mixture under ``name`` (replacing it)."""
        if not _LIST_NAME.match(name):
            raise StoreError(f"list name {name!r}: use letters, digits and . _ + = - (max 200 characters)")
        list_dir = self.root / LIST_DIR
        list_dir.mkdir(parents=True, exist_ok=True)
        path = list_dir / f"{name}.json"
        atomic_write_bytes(path, json.dumps(list(hashes)).encode())
        entry = {"path": f"{LIST_DIR}/{name}.json", "count": len(hashes), "sha256": file_sha256(path)}
        with store_lock(self.root):
            manifest = read_manifest(self.root)
            manifest.lists[name] = entry
            write_manifest(self.root, manifest)
            self._manifest = manifest

    def lists(self) -> dict[str, int]:
        return {k: int(v.get("count", 0)) for k, v in self._manifest.lists.items()}

    def get_list(self, name: str) -> list[str]:
        entry = self._manifest.lists.get(name)
        if entry is None:
            raise StoreError(f"{self.root}: no example list named {name!r} (lists: "
                             f"{', '.join(sorted(self._manifest.lists)) or 'none'})")
        path = safe_relpath(self.root, entry["path"], what="list")
        if not path.is_file():
            raise StoreError(f"{path}: example list file is missing")
        if self._verify and file_sha256(path) != entry.get("sha256"):
            raise StoreError(f"{path}: example list checksum mismatch: corrupt")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise StoreError(f"{path}: corrupt example list ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(h, str) for h in data):
            raise StoreError(f"{path}: example list must be a JSON array of hash strings")
        return data

    # -- reading -------------------------------------------------------------------------------
    def _shard_path(self, i: int) -> Path:
        entry = self._manifest.shards[i]
        path = safe_relpath(self.root, entry["path"], what="shard")
        if entry["path"] not in self._verified:
            check_shard(self.root, entry, verify=self._verify)
            self._verified.add(entry["path"])
        return path

    def _build_index(self) -> dict[str, list[tuple[int, int]]]:
        if self._index is None:
            index: dict[str, list[tuple[int, int]]] = {}
            for i in range(len(self._manifest.shards)):
                column = read_shard(self._shard_path(i), ["hash"]).column("hash").to_pylist()
                for row, h in enumerate(column):
                    index.setdefault(h, []).append((i, row))
            self._index = index
        return self._index

    def read_rows(self, hashes: list[str], columns: list[str] | None = None, *,
                  allow_missing: bool = False) -> tuple[pa.Table, int]:
        """Rows for ``hashes`` in that order (repeats allowed), reading only ``columns``."""
        index = self._build_index()
        missing = [h for h in hashes if h not in index]
        if missing and not allow_missing:
            raise StoreError(f"{self.root}: {len(missing)} of {len(hashes)} listed examples are missing from the "
                             f"store (e.g. {', '.join(missing[:3])}); score them first or pass --allow_missing")
        wanted = [h for h in hashes if h in index]
        cols = list(columns) if columns else None
        if cols and "hash" not in cols:
            cols = ["hash"] + cols
        by_shard: dict[int, list[int]] = {}
        for h in set(wanted):
            locs = index[h]
            if len(locs) > 1:
                self._check_duplicates(h, locs)
            by_shard.setdefault(locs[0][0], []).append(locs[0][1])
        parts = []
        for i, rows in sorted(by_shard.items()):
            table = read_shard(self._shard_path(i), cols)
            parts.append(table.take(pa.array(sorted(rows), pa.int64())))
        if not parts:
            empty = read_shard(self._shard_path(0), cols).slice(0, 0) if self._manifest.shards else pa.table({})
            return empty, len(missing)
        table = pa.concat_tables(parts, promote_options="default")
        position = {h: k for k, h in enumerate(table.column("hash").to_pylist())}
        take = np.fromiter((position[h] for h in wanted), dtype=np.int64, count=len(wanted))
        return table.take(pa.array(take)), len(missing)

    def _check_duplicates(self, h: str, locs: list[tuple[int, int]]) -> None:
        values = []
        for shard, row in locs:
            t = read_shard(self._shard_path(shard), list(VALUE_COLUMNS)).slice(row, 1).to_pylist()[0]
            values.append((self._manifest.shards[shard]["path"], t))
        first_path, first = values[0]
        for path, other in values[1:]:
            if other != first:
                raise StoreError(f"{self.root}: example {h} has different reference values in {first_path} "
                                 f"and {path}: the store mixes incompatible computations")


class ShardWriter:
    """Buffers rows; every ``rows_per_shard`` rows (and on close, even after an error) a shard is published."""

    def __init__(self, store: ReferenceStore, rows_per_shard: int):
        self.store = store
        self.rows_per_shard = max(1, int(rows_per_shard))
        self._buffer: list[dict] = []
        self.written = 0

    def add(self, row: dict) -> None:
        validate_row(row)
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def add_many(self, rows) -> None:
        for row in rows:
            self.add(row)

    def flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self.store._publish(rows)
            self.written += len(rows)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # nothing already computed is lost, even when the caller failed


def _clean_orphans(root: Path, manifest: Manifest, *, max_age_s: float = 86400.0) -> list[Path]:
    """Remove shard files not in the manifest and temporaries of dead writers (caller holds the lock)."""
    removed = []
    shard_dir = root / SHARD_DIR
    listed = {Path(s["path"]).name for s in manifest.shards}
    if shard_dir.is_dir():
        host = socket.gethostname()
        for path in shard_dir.iterdir():
            name = path.name
            if name.startswith(".tmp-"):
                pid = _tmp_pid(name)
                dead = pid is not None and name.startswith(f".tmp-{host}-") and not pid_alive(pid)
                stale = time.time() - path.stat().st_mtime > max_age_s
                if dead or stale:
                    path.unlink(missing_ok=True)
                    removed.append(path)
            elif name.endswith(".parquet") and name not in listed:
                path.unlink(missing_ok=True)  # renamed under the lock, so never a live writer's shard
                removed.append(path)
    return removed


def _tmp_pid(name: str) -> int | None:
    match = re.match(r"^\.tmp-.+-(\d+)-shard-[0-9a-f]{32}\.parquet$", name)
    return int(match.group(1)) if match else None


def merge_stores(dst, sources: list) -> dict:
    """Combine sub-stores (identities must match) into ``dst``; lists with one name must agree or are
    concatenated in source order when they are disjoint parts."""
    opened = [ReferenceStore.open(s, verify=True) for s in sources]
    if not opened:
        raise StoreError("merge needs at least one source store")
    identity = opened[0].identity
    for store in opened[1:]:
        diffs = identity_diff(identity, store.identity)
        if diffs:
            raise IdentityMismatchError(f"{store.root}: identity differs from {opened[0].root}: " + "; ".join(diffs))
    target = ReferenceStore.create_or_open(dst, identity, versions=opened[0].versions)
    have = target.hashes()
    copied = 0
    for store in opened:
        for i in range(len(store.shards)):
            table = read_shard(store._shard_path(i))
            keep = [k for k, h in enumerate(table.column("hash").to_pylist()) if h not in have]
            if keep:
                rows = table.take(pa.array(keep)).to_pylist()
                target._publish(rows)
                have.update(r["hash"] for r in rows)
                copied += len(rows)
    lists: dict[str, list[str]] = {}
    for store in opened:
        for name in store.lists():
            hashes = store.get_list(name)
            if name not in lists or lists[name] == hashes:
                lists[name] = hashes
            else:
                seen = set(lists[name])
                lists[name] = lists[name] + [h for h in hashes if h not in seen]
    for name, hashes in lists.items():
        target.record_list(name, hashes)
    return {"store": str(Path(dst)), "rows_copied": copied, "rows": target.num_rows(), "lists": target.lists()}



"""The reference store: a directory of Parquet shards plus a manifest, content-addressed by example hash.

Writing: rows are validated, buffered and flushed as shards; each shard is written to a temporary file,
fsynced, then (under the store lock) renamed into place and added to the manifest, which is replaced
atomically. A crash loses at most the shard in flight; a full disk is one :class:`DiskFullError` line and
leaves no temporary file, no unlisted shard and the manifest as it was. Several processes may write one
store at once.
Reading: each shard is verified when first opened; rows are fetched by hash, in the requested order,
reading only the row groups and columns needed, and every row returned has passed
:func:`~dpocache.artifacts.validate.check_rows` (with the same example's rows in other shards).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpocache.artifacts.cleanup import WriterLock, clean_orphans
from dpocache.artifacts.lists import (
    ROLE_TRAIN,
    check_hashes,
    check_list_name,
    check_role,
    describe_lists,
    free_list_name,
    list_role,
    read_list_file,
    write_list_file,
)
from dpocache.artifacts.manifest import (
    LOCK,
    MANIFEST,
    IdentityMismatchError,
    Manifest,
    StoreError,
    identity_diff,
    normalize_identity,
    read_manifest,
    store_lock,
    utc_now,
    write_manifest,
)
from dpocache.artifacts.shards import (
    ALL_COLUMNS,
    BASE_COLUMNS,
    BASE_FIELDS,
    SHARD_DIR,
    TOKEN_FIELDS,
    VALUE_COLUMNS,
    check_shard,
    conform_table,
    copy_temp_shard,
    new_shard_name,
    normalize_row,
    publish_shard,
    read_groups,
    rows_to_table,
    write_temp_shard,
)
from dpocache.artifacts.validate import Duplicates, check_rows, raise_defects
from dpocache.files import TMP_PREFIX

_STORE_ENTRIES = {MANIFEST, LOCK, SHARD_DIR, "lists", ".writers", ".claims"}
_OPEN_FILES = 32  # opened shards kept (LRU)
_CHECK_ROWS = 256  # rows checked together by the writer


class _Shard:
    """An opened, verified shard: its Parquet handle and the first row of each row group."""

    def __init__(self, path: Path, pf: pq.ParquetFile):
        self.path = path
        self.pf = pf
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.columns = set(pf.schema_arrow.names)

    def read(self, rows: list[int], columns: list[str]) -> pa.Table:
        """Rows (by position) in ascending position order, reading only the row groups that hold them."""
        rows_arr = np.asarray(sorted(rows), dtype=np.int64)
        groups = np.unique(np.searchsorted(self.starts, rows_arr, side="right") - 1)
        table = read_groups(self.path, self.pf, groups.tolist(), columns)
        # position of each wanted row inside the concatenation of the row groups read
        base = np.cumsum([0] + [int(self.starts[g + 1] - self.starts[g]) for g in groups[:-1]])
        group_of = np.searchsorted(self.starts, rows_arr, side="right") - 1
        local = rows_arr - self.starts[group_of] + base[np.searchsorted(groups, group_of)]
        return table.take(pa.array(local))


class ReferenceStore:
    """A reference store opened for reading (:meth:`open`) or writing (:meth:`create_or_open`)."""

    def __init__(self, root: Path, manifest: Manifest, *, verify: bool, writer_lock: WriterLock | None = None):
        self.root = root
        self._manifest = manifest
        self._verify = verify
        self._writer_lock = writer_lock
        self._open: OrderedDict[str, _Shard] = OrderedDict()
        self._checked: set[str] = set()
        self._index: dict[str, list[tuple[str, int]]] = {}
        self._indexed: set[str] = set()
        self._dup_checked: set[str] = set()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path, identity: dict, *, versions: dict | None = None) -> "ReferenceStore":
        """Open ``path`` for writing, creating it if needed; refuse a store of another identity."""
        root = Path(path)
        identity = normalize_identity(identity, where=str(root))
        versions = json.loads(json.dumps(versions, default=str)) if versions else None  # informational
        with store_lock(root):
            if (root / MANIFEST).exists():
                manifest = read_manifest(root)
                diffs = identity_diff(manifest.identity, identity)
                if diffs:
                    raise IdentityMismatchError(
                        f"{root / MANIFEST}: the store was scored by another reference; refusing to mix. "
                        f"{len(diffs)} differing field(s): " + "; ".join(diffs) + ". Use another store directory.")
                if versions and versions != manifest.versions:
                    manifest.versions = versions
                    write_manifest(root, manifest)
            else:
                strangers = sorted(p.name for p in root.iterdir()
                                   if p.name not in _STORE_ENTRIES and not p.name.startswith(TMP_PREFIX))
                if strangers:
                    raise StoreError(f"{root}: directory is not empty and is not a dpocache store (it holds "
                                     f"{', '.join(strangers[:5])}); choose an empty or new directory")
                manifest = Manifest(identity, versions or {}, created_at=utc_now())
                write_manifest(root, manifest)
            lock = WriterLock(root)
            clean_orphans(root, manifest, own_id=lock.id)
        return cls(root, manifest, verify=True, writer_lock=lock)

    @classmethod
    def open(cls, path, *, verify: bool = True) -> "ReferenceStore":
        """Open read-only. ``verify`` checks each shard's sha256 when it is first read."""
        root = Path(path)
        if not root.is_dir():
            raise StoreError(f"{root}: no such store directory")
        return cls(root, read_manifest(root), verify=verify)

    def close(self) -> None:
        """Release open shard files and, for a writable store, this process's writer registration."""
        self._open.clear()
        if self._writer_lock is not None:
            self._writer_lock.release()

    def __enter__(self) -> "ReferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refresh(self) -> None:
        """Re-read the manifest (other writers may have added shards or lists)."""
        self._manifest = read_manifest(self.root)

    # -- properties ----------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return dict(self._manifest.identity)

    @property
    def versions(self) -> dict:
        return dict(self._manifest.versions)

    @property
    def shards(self) -> list[dict]:
        return [dict(s) for s in self._manifest.shards]

    def num_rows(self) -> int:
        """Rows in the shards listed by the manifest (repeated hashes counted once per shard)."""
        self.refresh()
        return sum(int(s["rows"]) for s in self._manifest.shards)

    def hashes(self) -> set[str]:
        """Every example hash present in the store (re-reads the manifest first)."""
        self.refresh()
        return set(self._build_index())

    # -- writing -------------------------------------------------------------------------------
    def _require_writable(self, what: str) -> WriterLock:
        if self._writer_lock is None:
            raise StoreError(f"{self.root}: opened read-only; {what} needs ReferenceStore.create_or_open")
        return self._writer_lock

    def writer(self, *, rows_per_shard: int = 1024) -> "ShardWriter":
        self._require_writable("writing rows")
        if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
            raise StoreError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
        return ShardWriter(self, rows_per_shard)

    def add_table(self, table: pa.Table) -> dict:
        """Check a whole shard built in bulk (:func:`conform_table`, then the row checks every reader runs,
        :func:`check_rows`), then write and commit it as one shard; returns its manifest entry."""
        return self._publish_table(self.check_table(table))

    @staticmethod
    def check_table(table: pa.Table) -> pa.Table:
        """A shard table built in bulk, checked: schema (:func:`conform_table`), the row checks every reader runs
        (:func:`check_rows`), each example once. Returns it with the exact shard schema."""
        table = conform_table(table)
        raise_defects(check_rows(table))
        if pc.count_distinct(table.column("hash")).as_py() != table.num_rows:
            raise StoreError("the same hash appears twice in one shard (a chunk lists an example twice)")
        return table

    def _publish_table(self, table: pa.Table) -> dict:
        """Write one shard (temp file, fsync) and commit it."""
        lock = self._require_writable("writing rows")
        final = self.root / SHARD_DIR / new_shard_name()
        tmp = final.with_name(lock.temp_shard_name(final.name))
        write_temp_shard(tmp, table, name=final)
        return self._commit_shard(tmp, final, table.num_rows, table.column("hash").to_pylist())

    def _publish_file(self, source: Path, rows: int, hashes: list[str]) -> dict:
        """Copy an already verified shard file (fsynced under a temp name) and commit it."""
        lock = self._require_writable("writing rows")
        final = self.root / SHARD_DIR / new_shard_name()
        tmp = final.with_name(lock.temp_shard_name(final.name))
        copy_temp_shard(source, tmp, name=final)
        return self._commit_shard(tmp, final, rows, hashes)

    def _commit_shard(self, tmp: Path, final: Path, rows: int, hashes: list[str]) -> dict:
        """Under the store lock: rename the temp file into place and add it to the manifest."""
        try:
            with store_lock(self.root):
                manifest = read_manifest(self.root)
                entry = publish_shard(tmp, final, rows)
                manifest.shards.append(entry)
                manifest.scored_at = utc_now()
                self._write_manifest_or_undo(manifest, final, entry["path"])
        finally:
            tmp.unlink(missing_ok=True)  # only left when the commit failed before the rename
        self._manifest = manifest
        self._checked.add(entry["path"])
        if self._indexed:
            self._add_to_index(entry["path"], hashes)
        return entry

    def _write_manifest_or_undo(self, manifest: Manifest, new_file: Path, rel: str) -> None:
        """Replace the manifest; when that fails, remove ``new_file`` unless the manifest on disk lists it."""
        try:
            write_manifest(self.root, manifest)
        except BaseException:
            try:
                on_disk = read_manifest(self.root)
                listed = rel in {e["path"] for e in on_disk.shards} | {e["path"] for e in on_disk.lists.values()}
            except StoreError:
                listed = True  # unknown: keep it (an unlisted file is removed on the next open for writing)
            if not listed:
                new_file.unlink(missing_ok=True)
            raise

    def record_list(self, name: str, hashes: list[str], *, role: str = ROLE_TRAIN, mixture_sha256: str | None = None,
                    rename_if_taken: bool = False) -> str:
        """Record the ordered example list of a dataset/mixture under ``name`` (replacing an older one) with
        its ``role`` (``train`` or ``heldout``) and the digest of its mixture specification. With
        ``rename_if_taken`` (a name derived from the data, not chosen by the user) a list of that name recorded
        from another mixture is kept and this one takes the next free name (:func:`free_list_name`).
        Returns the name used."""
        self._require_writable("recording a list")
        check_list_name(name)
        check_role(role)
        if rename_if_taken and not mixture_sha256:
            raise StoreError("record_list: rename_if_taken needs the mixture digest (mixture_sha256)")
        hashes = check_hashes(hashes, f"example list {name!r}")
        with store_lock(self.root):
            manifest = read_manifest(self.root)
            if rename_if_taken:
                name = free_list_name(manifest.lists, name, mixture_sha256)
            old = manifest.lists.get(name)
            entry = write_list_file(self.root, name, hashes)
            entry["role"] = role
            if mixture_sha256:
                entry["mixture_sha256"] = mixture_sha256
            manifest.lists[name] = entry
            self._write_manifest_or_undo(manifest, self.root / entry["path"], entry["path"])
            self._manifest = manifest
            if old is not None and old["path"] != entry["path"]:
                (self.root / old["path"]).unlink(missing_ok=True)
        return name

    def free_list_name(self, name: str, mixture_sha256: str) -> str:
        """The name :meth:`record_list` with ``rename_if_taken`` would use now (see :func:`free_list_name`)."""
        self.refresh()
        return free_list_name(self._manifest.lists, name, mixture_sha256)

    def contains(self, hashes) -> list[bool]:
        """For each hash: is the example in the store (re-reads the manifest first; no copy of the index)?"""
        self.refresh()
        index = self._build_index()
        return [h in index for h in hashes]

    def locations(self, hashes) -> list[list[tuple[str, int]]]:
        """For each hash: its rows as (shard path, row), empty when absent (re-reads the manifest first)."""
        self.refresh()
        index = self._build_index()
        return [list(index.get(h, ())) for h in hashes]

    def shard_columns(self, rel: str) -> list[str]:
        """The columns of the shard ``rel`` (a manifest path)."""
        return list(self._shard(rel).pf.schema_arrow.names)

    def read_shard(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Every row of the shard ``rel``, in its order (default columns as :meth:`read_rows`)."""
        shard = self._shard(rel)
        return read_groups(shard.path, shard.pf, list(range(shard.pf.num_row_groups)), self._columns(columns))

    # -- named lists ---------------------------------------------------------------------------
    def lists(self) -> dict[str, int]:
        """Named example lists: name -> number of examples."""
        return {k: int(v["count"]) for k, v in self._manifest.lists.items()}

    def list_entries(self) -> dict[str, dict]:
        """Named example lists: name -> a copy of its manifest entry (path, count, sha256, role, ...)."""
        return {k: dict(v) for k, v in self._manifest.lists.items()}

    def list_roles(self) -> dict[str, str]:
        """Named example lists: name -> role (``train`` or ``heldout``; lists of older stores: ``train``)."""
        return {k: list_role(v) for k, v in self._manifest.lists.items()}

    def describe_lists(self) -> str:
        """``name (N examples, training|held-out)``, ... for messages."""
        return describe_lists(self._manifest.lists)

    def get_list(self, name: str) -> list[str]:
        """The ordered example hashes recorded under ``name``."""
        if name not in self._manifest.lists:
            self.refresh()
        entry = self._manifest.lists.get(name)
        if entry is None:
            raise StoreError(f"{self.root / MANIFEST}: no example list named {name!r} (lists: "
                             f"{', '.join(sorted(self._manifest.lists)) or 'none'})")
        if not (self.root / entry["path"]).is_file():
            self.refresh()  # replaced by a writer since this handle read the manifest
            entry = self._manifest.lists.get(name, entry)
        return read_list_file(self.root, name, entry, verify=self._verify)

    # -- reading -------------------------------------------------------------------------------
    def _shard(self, rel: str) -> _Shard:
        shard = self._open.get(rel)
        if shard is not None:
            self._open.move_to_end(rel)
            return shard
        entry = next(s for s in self._manifest.shards if s["path"] == rel)
        pf = check_shard(self.root, entry, verify=self._verify and rel not in self._checked)
        self._checked.add(rel)
        shard = self._open[rel] = _Shard(self.root / rel, pf)
        if len(self._open) > _OPEN_FILES:
            self._open.popitem(last=False)
        return shard

    def _add_to_index(self, rel: str, hashes: list[str]) -> None:
        for row, h in enumerate(hashes):
            self._index.setdefault(h, []).append((rel, row))
        self._indexed.add(rel)

    def _build_index(self) -> dict[str, list[tuple[str, int]]]:
        for entry in self._manifest.shards:
            rel = entry["path"]
            if rel not in self._indexed:
                shard = self._shard(rel)
                hashes = read_groups(shard.path, shard.pf, list(range(shard.pf.num_row_groups)), ["hash"])
                self._add_to_index(rel, hashes.column("hash").to_pylist())
        return self._index

    def _columns(self, columns: list[str] | None) -> list[str]:
        if columns is None:
            return list(BASE_COLUMNS)
        unknown = [c for c in columns if c not in ALL_COLUMNS]
        if unknown:
            raise StoreError(f"{self.root}: unknown column(s) {', '.join(unknown)} "
                             f"(columns: {', '.join(ALL_COLUMNS)})")
        return ["hash"] + [c for c in dict.fromkeys(columns) if c != "hash"]

    def read_rows(self, hashes: list[str], columns: list[str] | None = None, *,
                  allow_missing: bool = False) -> tuple[pa.Table, int]:
        """Rows for ``hashes`` in that order (repeats allowed), reading only ``columns`` (default: every
        column but the per-token ones; ``hash`` always comes first). Returns (table, number missing).
        Every row returned has passed :func:`check_rows` (and the same example's other rows agree): a bad
        row is a :class:`StoreError` naming its shard, row and example."""
        cols = self._columns(columns)
        index = self._build_index()
        missing = [h for h in hashes if h not in index]
        if missing and not allow_missing:
            raise StoreError(f"{self.root}: {len(missing)} of {len(hashes)} requested examples are missing from "
                             f"the store (e.g. {', '.join(missing[:3])}); score them first, or pass allow_missing "
                             "(--allow_missing) to drop them")
        wanted = [h for h in hashes if h in index]
        by_shard: dict[str, list[int]] = {}
        for h in dict.fromkeys(wanted):
            locs = index[h]
            if len(locs) > 1 and h not in self._dup_checked:
                self._check_duplicates(h, locs)
            rel, row = self._location(locs, cols)
            by_shard.setdefault(rel, []).append(row)
        parts = {rel: self._read_shard_rows(rel, rows, cols) for rel, rows in by_shard.items()}
        if not parts:
            empty = pa.schema([f for f in BASE_FIELDS + TOKEN_FIELDS if f.name in cols]).empty_table()
            return empty.select(cols), len(missing)
        table = pa.concat_tables(parts.values()) if len(parts) > 1 else next(iter(parts.values()))
        if check_rows(table):  # a bad row: check shard by shard to name its shard and row
            for rel, part in parts.items():
                path = str(self.root / rel)
                raise_defects(check_rows(part, shard=path, rows=sorted(by_shard[rel])), hint=self._damaged_hint())
        position = {h: k for k, h in enumerate(table.column("hash").to_pylist())}
        take = np.fromiter((position[h] for h in wanted), dtype=np.int64, count=len(wanted))
        return table.take(pa.array(take)), len(missing)

    def _location(self, locs: list[tuple[str, int]], cols: list[str]) -> tuple[str, int]:
        """Of an example's rows, the first in a shard holding every requested column (per-token values can
        be added to a store in a later shard)."""
        if len(locs) > 1:
            for rel, row in locs:
                if self._shard(rel).columns.issuperset(cols):
                    return rel, row
        return locs[0]

    def _read_shard_rows(self, rel: str, rows: list[int], cols: list[str]) -> pa.Table:
        """Rows of one shard, in ascending position order."""
        shard = self._shard(rel)
        absent = [c for c in cols if c not in shard.columns]
        if absent:
            raise StoreError(f"{shard.path}: shard has no column(s) {', '.join(absent)} (scored without "
                             "per-token log-probs)")
        return shard.read(rows, cols).select(cols)

    def _check_duplicates(self, h: str, locs: list[tuple[str, int]]) -> None:
        """The same example in several rows must carry identical reference values."""
        seen, defects = Duplicates(), []
        for rel, row in locs:
            shard = self._shard(rel)
            table = shard.read([row], ["hash", *VALUE_COLUMNS])
            defects += check_rows(table, shard=str(shard.path), rows=[row], duplicates=seen)
        raise_defects(defects, hint=self._damaged_hint())
        self._dup_checked.add(h)

    def _damaged_hint(self) -> str:
        return f"; the store is damaged: `dpocache inspect {self.root} --verify` lists every bad row (re-score them)"


class ShardWriter:
    """Buffers validated rows; every ``rows_per_shard`` rows, on :meth:`flush` and on close (even after an
    error) the buffer becomes one shard. A hash given twice keeps one row (an error if values differ)."""

    def __init__(self, store: ReferenceStore, rows_per_shard: int):
        self.store = store
        self.rows_per_shard = rows_per_shard
        self._buffer: dict[str, dict] = {}
        self.written = 0
        self.shards: list[dict] = []

    def add(self, row: dict) -> None:
        self.add_many([row])

    def add_many(self, rows) -> None:
        """Normalise and check ``rows`` (:func:`normalize_row`, :func:`check_rows`) in batches, then buffer them."""
        batch: list[dict] = []
        for row in rows:
            batch.append(normalize_row(row))
            if len(batch) >= _CHECK_ROWS:
                self._add_checked(batch)
                batch = []
        self._add_checked(batch)

    def _add_checked(self, rows: list[dict]) -> None:
        if not rows:
            return
        raise_defects(check_rows(rows_to_table(rows)))
        for clean in rows:
            prior = self._buffer.get(clean["hash"])
            if prior is not None:
                if any(prior[k] != clean[k] for k in VALUE_COLUMNS):
                    raise StoreError(f"row {clean['hash']}: added twice with different reference values")
                continue
            self._buffer[clean["hash"]] = clean
            if len(self._buffer) >= self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        """Publish the buffered rows as one shard (no-op when empty)."""
        if self._buffer:
            rows, self._buffer = list(self._buffer.values()), {}
            self.shards.append(self.store._publish_table(rows_to_table(rows)))
            self.written += len(rows)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # nothing already computed is lost, even when the caller failed


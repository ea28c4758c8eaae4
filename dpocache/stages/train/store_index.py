"""The per-example index of a store's example list: what stage two keeps in memory instead of the tokens.

:func:`list_index` returns a :class:`ListIndex` — for each example of the list, in list order: its hash,
padded length, reference sums and counts, and where its row lives (shard number, row in shard). Building
it reads only small columns of each shard (hash, reference values, trainable masks for the lengths and
the count check), one shard at a time, and validates every row the way training needs (finite sums that
are log-probabilities, counts equal to the masks, the same example in several shards with the same
values). The result is cached under ``$DPOCACHE_HOME/index/`` keyed by the list's and the shards' manifest
entries (checksums, sizes, row counts), each of those files' device, inode, size, mtime and ctime, and whether
checksums were verified, so a file edited, replaced or copied since is read and verified again; it is built by
one process per host (a file lock) and reused by the others and by later runs.
Memory: about 100 bytes per store row while building, ~100 bytes per listed example after.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpocache.artifacts import ReferenceStore, StoreError
from dpocache.artifacts.validate import check_rows, raise_defects
from dpocache.console import log
from pathlib import Path

from dpocache.files import TMP_PREFIX, atomic_write_json, dpocache_home, fsync_dir, fsync_file

INDEX_VERSION = 3
VALUE_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens"]
TOKEN_LOGP_COLUMNS = ["ref_chosen_token_logps", "ref_rejected_token_logps"]


@dataclass
class ListIndex:
    hashes: np.ndarray  # S64 [N]
    lengths: np.ndarray  # int32 [N], max(len chosen, len rejected)
    reference: np.ndarray  # float64 [N, 4]
    shard: np.ndarray  # int32 [N], position in ``shards``
    row: np.ndarray  # int32 [N], row inside the shard
    shards: list  # manifest entries (path, rows, bytes, sha256) + mtime_ns seen when the index was loaded
    missing: int = 0
    token_logps: bool = False  # every example's row holds per-token reference log-probs

    def __len__(self) -> int:
        return len(self.hashes)


def _file_signature(path) -> list | None:
    """Device, inode, size, mtime and ctime of a file (None when it is missing): any write to the file, a file
    renamed over it or a copy of the store changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cache_key(store: ReferenceStore, name: str, allow_missing: bool, verify: bool) -> str:
    """The manifest entries of the list and of every shard, and each file's signature as it is now: an index is
    reused only for the very files it was built (and verified) from; a verified build is never replaced by an
    unverified one."""
    entry = store._manifest.lists[name]
    files = [dict(entry, signature=_file_signature(store.root / entry["path"]))]
    files += [dict(s, signature=_file_signature(store.root / s["path"])) for s in store.shards]
    payload = json.dumps([INDEX_VERSION, files, bool(allow_missing), bool(verify)], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_shard(store: ReferenceStore, entry: dict, verify: bool) -> pa.Table:
    path = store.root / entry["path"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: shard listed in the manifest is missing") from None
    if len(data) != entry.get("bytes", len(data)):
        raise StoreError(f"{path}: shard is truncated or altered ({len(data)} bytes, manifest says {entry['bytes']})")
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StoreError(f"{path}: shard checksum mismatch (sha256 differs from the manifest): corrupt")
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        table = parquet.read(columns=["hash", *VALUE_COLUMNS, "chosen_mask", "rejected_mask"])
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: unreadable Parquet data ({exc})") from None
    if table.num_rows != entry["rows"]:
        raise StoreError(f"{path}: shard has {table.num_rows} rows, manifest says {entry['rows']}")
    return table, all(name in parquet.schema_arrow.names for name in TOKEN_LOGP_COLUMNS)


def _mask_stats(column: pa.ChunkedArray) -> np.ndarray:
    """The length of each row of a list mask column."""
    return pc.list_value_length(column.combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int64)


def _scan(store: ReferenceStore, verify: bool) -> dict[str, np.ndarray]:
    """Every store row's hash, values, length and location, one shard at a time."""
    parts = {k: [] for k in ("hash", "values", "length", "shard", "row", "tokens")}
    for s, entry in enumerate(store.shards):
        table, has_tokens = _read_shard(store, entry, verify)
        hashes = table.column("hash").to_numpy().astype("S64")
        values = np.stack([table.column(c).to_numpy().astype(np.float64) for c in VALUE_COLUMNS], 1)
        raise_defects(check_rows(table, shard=str(store.root / entry["path"])),
                      hint="; the store is damaged: re-score those examples")
        c_len, r_len = _mask_stats(table.column("chosen_mask")), _mask_stats(table.column("rejected_mask"))
        parts["hash"].append(hashes)
        parts["values"].append(values)
        parts["length"].append(np.maximum(c_len, r_len).astype(np.int32))
        parts["shard"].append(np.full(len(hashes), s, dtype=np.int32))
        parts["row"].append(np.arange(len(hashes), dtype=np.int32))
        parts["tokens"].append(np.full(len(hashes), has_tokens))
    if not parts["hash"]:
        return {"hash": np.zeros(0, "S64"), "values": np.zeros((0, 4)), "length": np.zeros(0, np.int32),
                "shard": np.zeros(0, np.int32), "row": np.zeros(0, np.int32), "tokens": np.zeros(0, bool)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def _check_duplicates(store: ReferenceStore, rows: dict, order: np.ndarray) -> None:
    """The same example in several shards must carry identical reference values."""
    h = rows["hash"][order]
    same = np.nonzero(h[1:] == h[:-1])[0]
    if not len(same):
        return
    a, b = order[same], order[same + 1]
    differ = (rows["values"][a] != rows["values"][b]).any(axis=1)
    if differ.any():
        k = int(np.argmax(differ))
        paths = [store.shards[int(rows["shard"][x])]["path"] for x in (a[k], b[k])]
        raise StoreError(f"{store.root}: example {h[same[k]].decode()} is stored twice with different reference "
                         f"values ({paths[0]} and {paths[1]}); the store is damaged: remove one of the shards "
                         "from the manifest or re-score into a new store")


def build_list_index(store: ReferenceStore, name: str, *, allow_missing: bool, verify: bool) -> ListIndex:
    return build_index(store, store.get_list(name), allow_missing=allow_missing, verify=verify, name=name)


def build_index(store: ReferenceStore, hashes, *, allow_missing: bool, verify: bool, name: str = "") -> ListIndex:
    """The index of the examples ``hashes`` (in that order, repeats allowed), validating every store row."""
    listed = np.asarray(hashes, dtype="S64")
    rows = _scan(store, verify)
    # by hash; among copies of one example, rows that also hold per-token reference values first
    order = np.lexsort((~rows["tokens"], rows["hash"]))
    _check_duplicates(store, rows, order)
    pos = np.searchsorted(rows["hash"], listed, sorter=order)
    found = order[np.minimum(pos, max(len(order) - 1, 0))] if len(order) else np.zeros(len(listed), np.int64)
    present = (rows["hash"][found] == listed) if len(order) else np.zeros(len(listed), bool)
    missing = int((~present).sum())
    if missing and not allow_missing:
        examples = ", ".join(h.decode() for h in listed[~present][:3])
        raise StoreError(f"{store.root}: {missing} of {len(listed)} examples of list '{name}' are missing from the "
                         f"store (e.g. {examples}); score them first, or pass --allow_missing to drop them")
    keep = found[present]
    return ListIndex(listed[present], rows["length"][keep], rows["values"][keep], rows["shard"][keep],
                     rows["row"][keep], [dict(s) for s in store.shards], missing, bool(rows["tokens"][keep].all()))


ARRAYS = ("hashes", "lengths", "reference", "shard", "row")


def _save(path: Path, index: ListIndex) -> None:
    """One ``.npy`` file per array in a directory renamed into place (complete or absent)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(index, name))
            fsync_file(tmp / f"{name}.npy")
        atomic_write_json(tmp / "meta.json", {"missing": index.missing, "token_logps": index.token_logps})
        fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, store: ReferenceStore) -> ListIndex:
    """The cached index, memory-mapped: a process reads the pages of the examples it trains (and every
    length, which the epoch order needs), not the whole index."""
    meta = json.loads((path / "meta.json").read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    arrays["lengths"] = np.array(arrays["lengths"])
    return ListIndex(**arrays, shards=[dict(s) for s in store.shards], missing=int(meta["missing"]),
                     token_logps=bool(meta["token_logps"]))


def _stamp(store: ReferenceStore, index: ListIndex) -> ListIndex:
    """Record each shard's size and mtime now: a shard that changes during training is then caught."""
    for entry in index.shards:
        path = store.root / entry["path"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{path}: shard listed in the manifest is missing") from None
        if st.st_size != entry["bytes"]:
            raise StoreError(f"{path}: shard is truncated or altered ({st.st_size} bytes, manifest says "
                             f"{entry['bytes']})")
        entry["mtime_ns"] = st.st_mtime_ns
    return index


def list_index(store: ReferenceStore, name: str, *, allow_missing: bool = False, verify: bool = True) -> ListIndex:
    """The index of list ``name`` (cached; see the module docstring)."""
    folder = dpocache_home() / "index"
    path = folder / _cache_key(store, name, allow_missing, verify)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f".{path.name}.lock", "a+")
    except OSError:
        return _stamp(store, build_list_index(store, name, allow_missing=allow_missing, verify=verify))
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per host; the others wait and load its result
        if path.is_dir():
            try:
                return _stamp(store, _load(path, store))
            except (OSError, ValueError, KeyError):
                shutil.rmtree(path, ignore_errors=True)  # a damaged cache is rebuilt
        log(f"stage two: indexing list '{name}' of {store.root} ({len(store.shards)} shard(s); once per store "
            "version)")
        index = build_list_index(store, name, allow_missing=allow_missing, verify=verify)
        try:
            _save(path, index)
        except OSError:
            pass  # a read-only cache only costs rebuilding next time
    return _stamp(store, index)

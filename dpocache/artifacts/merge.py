"""`dpocache store merge`: combine sub-stores scored by independent jobs into one store."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from dpocache.artifacts.lists import list_role
from dpocache.artifacts.manifest import IdentityMismatchError, StoreError, identity_diff
from dpocache.artifacts.shards import VALUE_COLUMNS, iter_row_groups
from dpocache.artifacts.store import ReferenceStore
from dpocache.artifacts.validate import check_rows, raise_defects


def _open_sources(dst: Path, sources: list) -> list[ReferenceStore]:
    if not sources:
        raise StoreError("store merge needs at least one source store")
    opened = [ReferenceStore.open(s, verify=True) for s in sources]
    for store in opened:
        if dst.exists() and store.root.resolve() == dst.resolve():
            raise StoreError(f"{store.root}: a merge source cannot also be the destination")
    first = opened[0]
    for store in opened[1:]:
        diffs = identity_diff(first.identity, store.identity)
        if diffs:
            raise IdentityMismatchError(f"{store.root}: identity differs from {first.root}; refusing to merge. "
                                        f"{len(diffs)} differing field(s): " + "; ".join(diffs))
    return opened


def _check_overlap(target: ReferenceStore, source_path: Path, table, overlap: list[int]) -> None:
    """Rows of ``table`` at ``overlap`` are already in ``target``: their values must be identical."""
    hashes = table.column("hash").take(overlap).to_pylist()
    mine, _ = target.read_rows(hashes, list(VALUE_COLUMNS))
    theirs = table.take(overlap).select(["hash", *VALUE_COLUMNS])
    if not mine.equals(theirs):
        for a, b in zip(mine.to_pylist(), theirs.to_pylist()):
            if a != b:
                raise StoreError(f"{source_path}: example {a['hash']} has different reference values than in "
                                 f"{target.root} ({a} vs {b}): the stores mix incompatible computations")


def _merge_shard(target: ReferenceStore, source: ReferenceStore, entry: dict, have: set[str]) -> int:
    """Copy one source shard's rows that ``target`` lacks; returns the number of rows copied."""
    shard = source._shard(entry["path"])  # verified (size, sha256, footer, schema) on first open
    for first, table in iter_row_groups(shard.path, shard.pf):  # rows checked as every reader checks them
        raise_defects(check_rows(table, shard=str(shard.path), first_row=first),
                      hint=f"; refusing to merge {source.root}")
    cheap = pq.read_table(shard.path, columns=["hash", *VALUE_COLUMNS])
    hashes = cheap.column("hash").to_pylist()
    overlap = [i for i, h in enumerate(hashes) if h in have]
    if overlap:
        _check_overlap(target, shard.path, cheap, overlap)
    fresh = [i for i, h in enumerate(hashes) if h not in have]
    if not fresh:
        return 0
    if not overlap:
        target._publish_file(shard.path, len(hashes), hashes)
    else:
        target._publish_table(pq.read_table(shard.path).take(fresh))
    have.update(hashes)
    return len(fresh)


def _merged_lists(sources: list[ReferenceStore]) -> dict[str, tuple[list[str], str, str | None]]:
    """name -> (hashes, role, mixture digest). Lists with one name: identical in every source -> that list;
    otherwise concatenated in source order. Role and digest come from the first source holding the list."""
    by_name: dict[str, list[list[str]]] = {}
    meta: dict[str, tuple[str, str | None]] = {}
    for store in sources:
        for name, entry in store.list_entries().items():
            by_name.setdefault(name, []).append(store.get_list(name))
            meta.setdefault(name, (list_role(entry), entry.get("mixture_sha256")))
    out = {}
    for name, parts in by_name.items():
        hashes = parts[0] if all(p == parts[0] for p in parts) else [h for p in parts for h in p]
        out[name] = (hashes, *meta[name])
    return out


def merge_stores(dst, sources: list) -> dict:
    """Merge ``sources`` into ``dst`` (created if needed). Identities must match; rows already present are
    skipped (their values must be identical); named lists are combined by :func:`_merged_lists` and
    replace ``dst``'s lists of the same names. Returns a summary."""
    dst = Path(dst)
    opened = _open_sources(dst, sources)
    with ReferenceStore.create_or_open(dst, opened[0].identity, versions=opened[0].versions) as target:
        have = target.hashes()
        copied = 0
        for store in opened:
            for entry in store.shards:
                copied += _merge_shard(target, store, entry, have)
        for name, (hashes, role, mixture) in _merged_lists(opened).items():
            target.record_list(name, hashes, role=role, mixture_sha256=mixture)
        return {"store": str(dst), "sources": [str(s.root) for s in opened], "rows_copied": copied,
                "rows": target.num_rows(), "examples": len(target.hashes()), "shards": len(target.shards),
                "lists": target.lists()}

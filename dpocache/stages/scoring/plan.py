"""Stage one's work plan: which examples this process scores, cut into chunks that are scored as one unit.

Contract:
- **Parts.** The unique examples are sorted by hash and dealt round-robin into parts: ``--num_shards N
  --shard_index I`` keeps every N-th example starting at I, and a multi-process launch (``WORLD_SIZE`` /
  ``RANK``) deals that part again between the ranks. Every example belongs to exactly one part, parts
  differ in size by at most one example whatever the dataset size, and no collective is needed: every
  process computes the same split from the same example list.
- **Chunks.** A part's examples, in hash order, are cut into chunks of ``--rows_per_shard``. A chunk is
  scored as one set of batches and written as one shard, so a rerun after a crash or preemption (the
  committed chunks are in the store, the chunk in flight is not) scores exactly the same batches as an
  uninterrupted run: the values are bit-identical. A chunk's examples already in the store are skipped.
- **Per-token units.** With ``--save_token_logps``, examples the store holds without per-token values are
  re-scored shard by shard (the rows of the existing shard, in its order: the batches of the original
  scoring), and the per-token values are added under the stored sums.
- Each chunk and unit has a **key** (a digest of its kind and example hashes), the name of its claim
  (:mod:`dpocache.artifacts.claims`) when several writers share a store.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """A unit of stage-one work: a chunk of dataset rows, or (``shard`` set) a stored shard to complete with
    per-token values."""

    key: str
    hashes: tuple[str, ...] = ()  # a chunk's example hashes, in hash order
    rows: tuple[int, ...] = ()    # the dataset row of each of them
    shard: str | None = None     # per-token units: the store shard whose rows are re-scored

    @property
    def kind(self) -> str:
        return "tokens" if self.shard is not None else "score"


def split_levels(num_shards: int, shard_index: int) -> list[tuple[str, int, int]]:
    """The split this process scores: ``[(name, parts, index), ...]`` applied one after another (the
    ``--num_shards`` part, then this rank's share of it under a multi-process launch)."""
    levels = [("part", num_shards, shard_index)] if num_shards > 1 else []
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        levels.append(("rank", world, int(os.environ.get("RANK", "0") or 0)))
    return levels


def describe_levels(levels: list[tuple[str, int, int]]) -> str:
    """``part 2/4``, ``rank 1/2``, ``part 0/2, rank 1/8`` (empty for the whole dataset)."""
    return ", ".join(f"{name} {index}/{parts}" for name, parts, index in levels)


def deal(items: list, levels: list[tuple[str, int, int]]) -> list:
    """This process's share of ``items`` (already in a canonical order): round-robin at each level."""
    for _, parts, index in levels:
        items = items[index::parts]
    return items


def part_order(hashes: list[str], levels: list[tuple[str, int, int]]) -> list[int]:
    """Indices of this process's examples, in hash order (see the module docstring)."""
    return deal(sorted(range(len(hashes)), key=hashes.__getitem__), levels)


def unit_key(kind: str, hashes) -> str:
    digest = hashlib.sha256(kind.encode())
    for h in hashes:
        digest.update(b"\0" + h.encode())
    return f"{kind}-{digest.hexdigest()[:32]}"


def plan_chunks(hashes: list[str], existing: set[str], rows_per_chunk: int,
                levels: list[tuple[str, int, int]]) -> list[Unit]:
    """This process's chunks that still hold examples missing from the store (``existing``)."""
    order = part_order(hashes, levels)
    units = []
    for k in range(0, len(order), rows_per_chunk):
        rows = order[k:k + rows_per_chunk]
        chunk = tuple(hashes[i] for i in rows)
        if any(h not in existing for h in chunk):
            units.append(Unit(unit_key("score", chunk), chunk, tuple(rows)))
    return units


def todo_rows(unit: Unit, present: list[bool]) -> list[int]:
    """Dataset rows of a chunk whose examples are not in the store yet (``present``: per example of the chunk)."""
    return [i for i, have in zip(unit.rows, present) if not have]


def plan_token_units(wanted: list[str], index: dict, shard_columns, levels: list[tuple[str, int, int]]) -> list[Unit]:
    """Shards to complete with per-token values: for each wanted example the store holds only without them,
    its first shard; the shards are dealt between parts like examples. ``index`` maps each stored hash to its
    rows [(shard, row)],
    ``shard_columns(shard)`` gives a shard's column names."""
    from dpocache.artifacts.shards import TOKEN_COLUMNS

    has_tokens: dict[str, bool] = {}

    def with_tokens(rel: str) -> bool:
        if rel not in has_tokens:
            has_tokens[rel] = set(TOKEN_COLUMNS) <= set(shard_columns(rel))
        return has_tokens[rel]

    shards: set[str] = set()
    for h in dict.fromkeys(wanted):
        locs = index.get(h)
        if locs and not any(with_tokens(rel) for rel, _ in locs):
            shards.add(locs[0][0])
    return [Unit(unit_key("tokens", [rel]), shard=rel) for rel in deal(sorted(shards), levels)]

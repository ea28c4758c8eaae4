"""From scored units to committed shards, in a background thread.

Contract: :class:`Committer` takes (unit, chunk data, pending scores) from the scoring loop through a small
bounded queue and, in its own thread, waits for the device, builds the shard as an Arrow table (ids and
masks are the unit's own Arrow columns; sums, counts and per-token values numpy arrays), validates it in
bulk, commits it and releases the unit's claim, while the scoring loop computes the next unit. A unit that
adds per-token values to stored examples keeps the stored sums and counts (they stay authoritative) and is
refused when the recomputed values do not sum to them within the store's tolerance. An error is raised in
the scoring thread at its next :meth:`Committer.submit`; :meth:`Committer.close` commits everything handed
over before it returns (nothing computed is lost).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpocache.artifacts.manifest import StoreError
from dpocache.artifacts.shards import BASE_COLUMNS, SIDES, schema
from dpocache.stages.scoring.batches import EXAMPLE_COLUMNS, ChunkData, ChunkScores

TOKEN_TOLERANCE = (1e-3, 1e-4)  # absolute, relative: the store's check of per-token values against sums


def _token_column(chunk: ChunkData, values: np.ndarray, side: int) -> pa.Array:
    n = chunk.rows
    offsets = chunk.offsets[side * n:(side + 1) * n + 1]
    lo, hi = int(offsets[0]), int(offsets[-1])
    return pa.ListArray.from_arrays(pa.array((offsets - lo).astype(np.int32)), pa.array(values[lo:hi]))


def _assemble(chunk: ChunkData, columns: dict, with_tokens: bool) -> pa.Table:
    sch = schema(with_tokens)
    arrays = []
    for f in sch:
        column = columns[f.name]
        arrays.append(column if column.type.equals(f.type) else column.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=sch)


def shard_table(chunk: ChunkData, scores: ChunkScores, keep_tokens: bool) -> pa.Table:
    """The shard of newly scored examples."""
    n = chunk.rows
    columns = {name: chunk.table.column(name) for name in EXAMPLE_COLUMNS}
    for s, side in enumerate(SIDES):
        columns[f"ref_{side}_logps"] = pa.array(scores.sums[s * n:(s + 1) * n], pa.float64())
        columns[f"ref_{side}_tokens"] = pa.array(scores.counts[s * n:(s + 1) * n].astype(np.int32), pa.int32())
        if keep_tokens:
            columns[f"ref_{side}_token_logps"] = _token_column(chunk, scores.tokens, s)
    return _assemble(chunk, columns, keep_tokens)


def token_table(chunk: ChunkData, scores: ChunkScores, where: str) -> pa.Table:
    """Stored rows (``chunk.table``: every base column) completed with the recomputed per-token values."""
    n, hashes = chunk.rows, chunk.hashes
    columns = {name: chunk.table.column(name) for name in BASE_COLUMNS}
    for s, side in enumerate(SIDES):
        stored = columns[f"ref_{side}_logps"].to_numpy()
        counts = columns[f"ref_{side}_tokens"].to_numpy()
        bad = np.flatnonzero(scores.counts[s * n:(s + 1) * n] != counts)
        if bad.size:
            raise StoreError(f"{where}: example {hashes[bad[0]]}: {side} trainable-token count differs from the "
                             "store's; the shard does not match its own ids and masks")
        lo, hi = int(chunk.offsets[s * n]), int(chunk.offsets[(s + 1) * n])
        summed = np.add.reduceat(scores.tokens[lo:hi].astype(np.float64), chunk.offsets[s * n:(s + 1) * n] - lo)
        gap = np.abs(summed - stored)
        bad = np.flatnonzero(gap > TOKEN_TOLERANCE[0] + TOKEN_TOLERANCE[1] * np.abs(stored))
        if bad.size:
            k = int(bad[0])
            raise StoreError(
                f"{where}: example {hashes[k]}: the recomputed {side} per-token values sum to {summed[k]:.6f}, the "
                f"store holds {stored[k]:.6f} (beyond the store's tolerance): this computation does not reproduce "
                "the stored reference values. The shard's rows are re-scored in their own order, so use the "
                "--batch_size, --dtype and kind of device the store was scored with, or score into a new store")
        columns[f"ref_{side}_token_logps"] = _token_column(chunk, scores.tokens, s)
    return _assemble(chunk, columns, True)


class Committer:
    """The commit thread (see the module docstring)."""

    def __init__(self, store, claims, guard: threading.Lock, *, keep_tokens: bool, depth: int = 2):
        self.store, self.claims, self.guard, self.keep_tokens = store, claims, guard, keep_tokens
        self.scored = self.completed = self.shards = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="dpocache-commit", daemon=True)
        self._thread.start()

    def submit(self, unit, chunk: ChunkData, pending) -> None:
        self.check()
        self._queue.put((unit, chunk, pending))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, *, raise_errors: bool = True) -> None:
        """Commit everything handed over, stop the thread; re-raise its error (``raise_errors``)."""
        self._queue.put(None)
        self._thread.join()
        if raise_errors:
            self.check()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            unit = item[0]
            try:
                if self.error is None:  # after a failure the rest is dropped (and its claims released)
                    self._commit(*item)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the scoring thread
                self.error = exc
            finally:
                self.claims.release(unit.key)

    def _commit(self, unit, chunk: ChunkData, pending) -> None:
        scores = pending.collect()
        if unit.shard is None:
            table = shard_table(chunk, scores, self.keep_tokens)
        else:
            table = token_table(chunk, scores, f"{self.store.root / unit.shard}")
        with self.guard:
            if unit.shard is None and not self.claims.holds(unit.key):
                # another writer took the claim over (this one looked dead): keep only what the store lacks
                present = pa.array(list(self.store.hashes()), pa.string())
                table = table.filter(pc.invert(pc.is_in(table.column("hash"), value_set=present)))
            if table.num_rows:
                self.store.add_table(table)
                self.shards += 1
        if unit.shard is None:
            self.scored += table.num_rows
        else:
            self.completed += table.num_rows

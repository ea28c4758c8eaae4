"""The row checks of a reference store: one function for every reader and for the writer.

Contract: :func:`check_rows` takes a batch of store rows (an Arrow record batch or table holding
``hash`` and any of the other store columns) and returns the defects it finds, each naming the shard,
the row (position in its shard) and the example hash. It checks what the present columns allow:

- hash: 64 lowercase hex characters; no null values in any column;
- per side: ids non-empty; mask as long as the ids, holding only 0 and 1, ``mask[0] == 0``;
- reference sums finite and not above 0 (beyond :data:`LOGP_SUM_TOLERANCE` of rounding); counts equal
  to ``sum(mask)``;
- per-token values (when present): as long as the ids, finite, 0 where the mask is 0, summing to the
  stored sum (``1e-3 + 1e-4 * |sum|``);
- with a :class:`Duplicates` tracker: the same example seen again (in this batch, another batch or
  another shard) must carry identical reference values.

Callers: the shard writer (every batch before it is buffered), :meth:`ReferenceStore.read_rows` (every
row it returns, so stage two sees only checked rows), ``dpocache inspect --verify`` (every row group of
every shard) and ``dpocache store merge`` (every source shard). :func:`raise_defects` turns defects into
one :class:`StoreError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpocache.artifacts.manifest import StoreError

LOGP_SUM_TOLERANCE = 1e-3  # a sum of log-probs may exceed 0 only by rounding
SIDES = ("chosen", "rejected")
VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens")
HASH_PATTERN = r"^[0-9a-f]{64}$"


@dataclass(frozen=True)
class Defect:
    """One bad row: where it is (``shard`` None for rows not yet written) and what is wrong."""

    shard: str | None
    row: int | None
    hash: str
    problem: str

    def __str__(self) -> str:
        if self.shard is None:
            return f"row {self.hash}: {self.problem}"
        return f"{self.shard}: row {self.row} (example {self.hash}): {self.problem}"

    def to_json(self) -> dict:
        return {"shard": self.shard, "row": self.row, "hash": self.hash, "problem": self.problem}


class Duplicates:
    """The reference values first seen for each tracked example (``track`` None: every example)."""

    def __init__(self, track: Iterable[str] | None = None):
        self._track = None if track is None else set(track)
        self._first: dict[str, tuple[str | None, int | None, tuple]] = {}

    def check(self, hashes: list[str], values: np.ndarray, shard: str | None, rows: np.ndarray) -> list[Defect]:
        out = []
        for i, h in enumerate(hashes):
            if self._track is not None and h not in self._track:
                continue
            mine = tuple(values[i].tolist())
            first = self._first.setdefault(h, (shard, int(rows[i]), mine))
            if first[2] != mine:
                diff = ", ".join(f"{k} {a!r} vs {b!r}" for k, a, b in zip(VALUE_COLUMNS, first[2], mine) if a != b)
                where = f"{first[0]} row {first[1]}" if first[0] is not None else "an earlier row"
                out.append(Defect(shard, int(rows[i]), h, f"different reference values than in {where} ({diff}): "
                                  "the store mixes incompatible computations"))
        return out


class _Rows:
    """Collects (row index, problem) pairs of one batch."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.found: list[tuple[int, str]] = []
        self._columns: dict[str, pa.Array] = {}

    def column(self, name: str) -> pa.Array | None:
        if name not in self.table.column_names:
            return None
        if name not in self._columns:
            self._columns[name] = self.table.column(name).combine_chunks()
        return self._columns[name]

    def flag(self, bad: np.ndarray, problem) -> None:
        """``problem(i)`` for every row ``i`` where ``bad`` is true."""
        if not bad.any():
            return
        for i in np.flatnonzero(bad):
            self.found.append((int(i), problem(int(i))))


def _flat(values: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lengths, flattened values, row of each value) of a list array."""
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = values.flatten().to_numpy(zero_copy_only=False)
    parent = np.repeat(np.arange(len(values)), lengths)
    return lengths, flat, parent


def _check_side(rows: _Rows, side: str, n: int) -> None:
    ids, mask = rows.column(f"{side}_input_ids"), rows.column(f"{side}_mask")
    total, count = rows.column(f"ref_{side}_logps"), rows.column(f"ref_{side}_tokens")
    tokens = rows.column(f"ref_{side}_token_logps")
    ids_len = None
    if ids is not None:
        ids_len = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        rows.flag(ids_len == 0, lambda i: f"{side}_input_ids is empty")
    sums = None
    if total is not None:
        sums = total.to_numpy(zero_copy_only=False).astype(np.float64)
        finite = np.isfinite(sums)
        rows.flag(~finite, lambda i: f"ref_{side}_logps is not a finite number ({float(sums[i])!r})")
        rows.flag(finite & (sums > LOGP_SUM_TOLERANCE),
                  lambda i: f"ref_{side}_logps = {sums[i]} > 0 is not a log-probability sum")
    if mask is None:
        return
    mask_len, flat, parent = _flat(mask)
    if ids_len is not None:
        rows.flag(mask_len != ids_len, lambda i: f"{side} mask length {mask_len[i]} != ids length {ids_len[i]}")
    rows.flag(np.bincount(parent[(flat != 0) & (flat != 1)], minlength=n) > 0,
              lambda i: f"{side}_mask must hold only 0 and 1")
    starts = np.concatenate([[0], np.cumsum(mask_len)[:-1]]).astype(np.int64)
    first_one = np.zeros(n, dtype=bool)
    first_one[mask_len > 0] = flat[starts[mask_len > 0]] == 1
    rows.flag(first_one, lambda i: f"{side}_mask[0] is 1, but the first token has no log-prob (must be 0)")
    trainable = np.bincount(parent, weights=(flat == 1).astype(np.float64), minlength=n).astype(np.int64)
    if count is not None:
        counts = count.to_numpy(zero_copy_only=False).astype(np.int64)
        rows.flag(counts != trainable,
                  lambda i: f"ref_{side}_tokens {counts[i]} != trainable tokens in mask {trainable[i]}")
    if tokens is not None:
        _check_token_logps(rows, side, n, tokens, mask_len, flat, sums)


def _check_token_logps(rows: _Rows, side: str, n: int, tokens: pa.Array, mask_len: np.ndarray,
                       mask_flat: np.ndarray, sums: np.ndarray | None) -> None:
    column = f"ref_{side}_token_logps"
    tok_len, tok, parent = _flat(tokens)
    rows.flag(tok_len != mask_len, lambda i: f"{column} length {tok_len[i]} != ids length {mask_len[i]}")
    if not np.array_equal(tok_len, mask_len):
        return  # values no longer line up with the mask: the length defect is reported
    tok = tok.astype(np.float64)
    finite = np.isfinite(tok)
    bad_value = np.bincount(parent[~finite], minlength=n) > 0
    rows.flag(bad_value, lambda i: f"{column} holds NaN or infinite values")
    rows.flag(np.bincount(parent[(mask_flat == 0) & (tok != 0)], minlength=n) > 0,
              lambda i: f"{column} must be 0 where {side}_mask is 0")
    if sums is not None:
        summed = np.bincount(parent, weights=np.where(finite, tok, 0.0), minlength=n)
        off = ~bad_value & np.isfinite(sums) & (np.abs(summed - sums) > 1e-3 + 1e-4 * np.abs(sums))
        rows.flag(off, lambda i: f"{column} sums to {summed[i]}, but ref_{side}_logps is {sums[i]}")


def _nulls(rows: _Rows) -> bool:
    """Flag null values (a store column is never null); True when any were found."""
    for name in rows.table.column_names:
        if rows.table.column(name).null_count:
            column = rows.column(name)
            rows.flag(column.is_null().to_numpy(zero_copy_only=False), lambda i, name=name: f"{name} is null")
    return bool(rows.found)


def check_rows(batch: pa.RecordBatch | pa.Table, *, shard: str | None = None, first_row: int = 0,
               rows: np.ndarray | list[int] | None = None, duplicates: Duplicates | None = None) -> list[Defect]:
    """Every defect of ``batch`` (see the module docstring), in row order. ``rows`` gives each row's position
    in its shard (default ``first_row, first_row + 1, ...``); ``shard`` names it (None: rows being written)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    n = table.num_rows
    positions = np.arange(first_row, first_row + n) if rows is None else np.asarray(rows, dtype=np.int64)
    if n == 0:
        return []
    found = _Rows(table)
    if not _nulls(found):
        hashes = found.column("hash")
        if hashes is not None:
            good = pc.match_substring_regex(hashes, HASH_PATTERN).to_numpy(zero_copy_only=False)
            found.flag(~good, lambda i: "hash must be 64 lowercase hex characters")
        for side in SIDES:
            _check_side(found, side, n)
    names = table.column("hash").to_pylist() if "hash" in table.column_names else [""] * n
    ordered = sorted(found.found, key=lambda f: f[0])  # stable: a row's defects in the order they were checked
    defects = [Defect(shard, int(positions[i]), str(names[i]), problem) for i, problem in ordered]
    if duplicates is not None and not defects and all(c in table.column_names for c in VALUE_COLUMNS):
        values = np.stack([table.column(c).to_numpy().astype(np.float64) for c in VALUE_COLUMNS], 1)
        defects += duplicates.check(names, values, shard, positions)
    return defects


def raise_defects(defects: list[Defect], *, hint: str = "") -> None:
    """Raise the first defect as one :class:`StoreError` line (with the count of the others)."""
    if not defects:
        return
    more = f" (and {len(defects) - 1} more defect(s))" if len(defects) > 1 else ""
    raise StoreError(f"{defects[0]}{more}{hint}")

"""Whole shards at once: the row checks of :func:`dpocache.artifacts.shards.validate_row`, vectorised over
an Arrow table (stage one builds its shards from Arrow columns and numpy arrays, never row by row).

Contract: :func:`validate_table` returns the table with the exact shard schema, or raises a
:class:`StoreError` naming the first offending row's hash and its defect, in the words of ``validate_row``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpocache.artifacts.manifest import StoreError
from dpocache.artifacts.shards import LOGP_SUM_TOLERANCE, SIDES, TOKEN_COLUMNS, schema


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


def _check_schema(table: pa.Table) -> pa.Table:
    with_tokens = TOKEN_COLUMNS[0] in table.column_names or TOKEN_COLUMNS[1] in table.column_names
    expected = schema(with_tokens)
    if table.column_names != expected.names:
        raise StoreError(f"a shard table must have the columns {', '.join(expected.names)} (got "
                         f"{', '.join(table.column_names)})")
    for f in expected:
        if not table.schema.field(f.name).type.equals(f.type):
            raise StoreError(f"shard table column {f.name} is {table.schema.field(f.name).type}, expected {f.type}")
        if table.column(f.name).null_count:
            raise StoreError(f"shard table column {f.name} holds nulls")
    return pa.Table.from_arrays(table.columns, schema=expected)


def _check_side(table: pa.Table, hashes: list[str], side: str) -> None:
    def fail(bad: np.ndarray, defect, owner: np.ndarray | None = None) -> None:
        """Raise for the first True of ``bad`` (per row, or per token with ``owner`` mapping it to its row)."""
        hits = np.flatnonzero(bad)
        if hits.size:
            row = int(owner[hits[0]]) if owner is not None else int(hits[0])
            raise StoreError(f"row {hashes[row]}: {defect(row) if callable(defect) else defect}")

    ids, lengths = _flat(table.column(f"{side}_input_ids"))
    mask, mask_lengths = _flat(table.column(f"{side}_mask"))
    fail(lengths == 0, f"{side}_input_ids must be a non-empty 1-D integer sequence")
    fail(mask_lengths != lengths, lambda r: f"{side} mask length {mask_lengths[r]} != ids length {lengths[r]}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    fail((mask != 0) & (mask != 1), f"{side}_mask must hold only 0 and 1", owner)
    fail(mask[starts] != 0, f"{side}_mask[0] is 1, but the first token has no log-prob (must be 0)")
    sums = table.column(f"ref_{side}_logps").to_numpy()
    fail(~np.isfinite(sums), lambda r: f"ref_{side}_logps is not a finite number ({sums[r]!r})")
    fail(sums > LOGP_SUM_TOLERANCE, lambda r: f"ref_{side}_logps = {sums[r]} > 0 is not a log-probability sum")
    counts = table.column(f"ref_{side}_tokens").to_numpy()
    trainable = np.add.reduceat(mask.astype(np.int64), starts)
    fail(counts != trainable,
         lambda r: f"ref_{side}_tokens {counts[r]} != trainable tokens in mask {trainable[r]}")
    column = f"ref_{side}_token_logps"
    if column not in table.column_names:
        return
    tok, tok_lengths = _flat(table.column(column))
    fail(tok_lengths != lengths, lambda r: f"{column} length {tok_lengths[r]} != ids length {lengths[r]}")
    fail(~np.isfinite(tok), f"{column} holds NaN or infinite values", owner)
    fail((tok != 0) & (mask == 0), f"{column} must be 0 where {side}_mask is 0", owner)
    summed = np.add.reduceat(tok.astype(np.float64), starts)
    fail(np.abs(summed - sums) > 1e-3 + 1e-4 * np.abs(sums),
         lambda r: f"{column} sums to {summed[r]}, but ref_{side}_logps is {sums[r]}")


def validate_table(table: pa.Table) -> pa.Table:
    """Check every row of a would-be shard (see the module docstring)."""
    table = _check_schema(table)
    hashes = table.column("hash").to_pylist()
    if table.num_rows == 0:
        raise StoreError("a shard needs at least one row")
    ok = pc.match_substring_regex(table.column("hash"), "^[0-9a-f]{64}$").to_numpy(zero_copy_only=False)
    if not ok.all():
        raise StoreError(f"row {hashes[int(np.flatnonzero(~ok)[0])]!r}: hash must be 64 lowercase hex characters")
    if len(set(hashes)) != len(hashes):
        seen: set[str] = set()
        dup = next(h for h in hashes if h in seen or seen.add(h))
        raise StoreError(f"row {dup}: the same hash appears twice in one shard")
    for side in SIDES:
        _check_side(table, hashes, side)
    return table

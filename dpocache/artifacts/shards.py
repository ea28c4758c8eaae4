"""Shard schema, row normalisation, Arrow table building and atomic, verified shard files.

:func:`normalize_row` checks a row's structure (columns, types, shapes) and converts it to the schema's
dtypes; what the values mean (masks, sums, counts, per-token values) is checked by
:func:`dpocache.artifacts.validate.check_rows`, the same function every reader runs.
"""

from __future__ import annotations

import numbers
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpocache.artifacts.manifest import StoreError
from dpocache.artifacts.validate import SIDES, VALUE_COLUMNS
from dpocache.files import copy_file_synced, disk_errors, file_sha256, replace_synced, synced_new_file

SHARD_DIR = "shards"
ROW_GROUP_ROWS = 64  # small row groups: a training batch reads a few of them, never a whole shard
COMPRESSION = "zstd"
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
__all__ = ["SIDES", "VALUE_COLUMNS"]  # re-exported for the store's modules

BASE_FIELDS = [
    pa.field("hash", pa.string(), nullable=False),
    pa.field("chosen_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("chosen_mask", pa.list_(pa.int8()), nullable=False),
    pa.field("rejected_input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rejected_mask", pa.list_(pa.int8()), nullable=False),
    pa.field("ref_chosen_logps", pa.float64(), nullable=False),
    pa.field("ref_rejected_logps", pa.float64(), nullable=False),
    pa.field("ref_chosen_tokens", pa.int32(), nullable=False),
    pa.field("ref_rejected_tokens", pa.int32(), nullable=False),
]
TOKEN_FIELDS = [pa.field(name, pa.list_(pa.float32()), nullable=False) for name in TOKEN_COLUMNS]
BASE_COLUMNS = [f.name for f in BASE_FIELDS]
ALL_COLUMNS = BASE_COLUMNS + list(TOKEN_COLUMNS)
_INT32 = np.iinfo(np.int32)


def schema(with_token_logps: bool) -> pa.Schema:
    return pa.schema(BASE_FIELDS + (TOKEN_FIELDS if with_token_logps else []))


def _int_vector(row_name: str, column: str, value, dtype) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"row {row_name}: {column} is not an integer sequence ({exc})") from None
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iub":
        raise StoreError(f"row {row_name}: {column} must be a non-empty 1-D integer sequence "
                         f"(got {type(value).__name__} with dtype {arr.dtype}, shape {arr.shape})")
    if arr.min() < _INT32.min or arr.max() > _INT32.max:
        raise StoreError(f"row {row_name}: {column} has values outside int32")
    return arr.astype(dtype, copy=False)


def _real(row_name: str, column: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise StoreError(f"row {row_name}: {column} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _count(row_name: str, column: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise StoreError(f"row {row_name}: {column} must be an integer, got {type(value).__name__} {value!r}")
    if not _INT32.min <= int(value) <= _INT32.max:
        raise StoreError(f"row {row_name}: {column} = {value} is outside int32")
    return int(value)


def _float_vector(row_name: str, column: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"row {row_name}: {column} is not a float sequence ({exc})") from None
    if arr.ndim != 1:
        raise StoreError(f"row {row_name}: {column} must be a 1-D float sequence (shape {arr.shape})")
    return arr


def normalize_row(row: dict) -> dict:
    """Check a row's structure and return it with numpy arrays of the schema dtypes; errors name the hash.
    Its values are checked by :func:`~dpocache.artifacts.validate.check_rows`."""
    if not isinstance(row, dict):
        raise StoreError(f"a store row must be a dict, got {type(row).__name__}")
    name = row.get("hash", "<no hash>")
    missing = [c for c in BASE_COLUMNS if c not in row]
    if missing:
        raise StoreError(f"row {name}: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(row) - set(ALL_COLUMNS))
    if unknown:
        raise StoreError(f"row {name}: unknown column(s) {', '.join(unknown)}")
    if not isinstance(name, str) or not HASH_RE.match(name):
        raise StoreError(f"row {name!r}: hash must be 64 lowercase hex characters")
    present = [row.get(c) is not None for c in TOKEN_COLUMNS]
    if present[0] != present[1]:
        raise StoreError(f"row {name}: give both per-token columns ({', '.join(TOKEN_COLUMNS)}) or neither")
    out: dict = {"hash": name}
    for side in SIDES:
        out[f"{side}_input_ids"] = _int_vector(name, f"{side}_input_ids", row[f"{side}_input_ids"], np.int32)
        out[f"{side}_mask"] = _int_vector(name, f"{side}_mask", row[f"{side}_mask"], np.int8)
        out[f"ref_{side}_logps"] = _real(name, f"ref_{side}_logps", row[f"ref_{side}_logps"])
        out[f"ref_{side}_tokens"] = _count(name, f"ref_{side}_tokens", row[f"ref_{side}_tokens"])
        if present[0]:
            column = f"ref_{side}_token_logps"
            out[column] = _float_vector(name, column, row[column])
    return out


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.array([], dtype=value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Normalised rows (from :func:`normalize_row`) to a table with the explicit shard schema."""
    with_tokens = TOKEN_COLUMNS[0] in rows[0]
    if any((TOKEN_COLUMNS[0] in r) != with_tokens for r in rows):
        raise StoreError("rows of one shard must all have the per-token columns or all lack them")
    sch = schema(with_tokens)
    columns = []
    for f in sch:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type):
            columns.append(_list_array(values, f.type.value_type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=sch)


def new_shard_name() -> str:
    return f"shard-{uuid.uuid4().hex}.parquet"


def write_temp_shard(path: Path, table: pa.Table, *, name: Path) -> None:
    """Write ``table`` to ``path`` (a temporary name) and fsync it; nothing is left behind on failure, and a full
    disk is a :class:`~dpocache.files.DiskFullError` naming ``name`` (the shard's final path)."""
    with disk_errors(name, what="creating the shard directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with synced_new_file(path, name=name, needed=table.nbytes, what="writing a shard") as fh:
        pq.write_table(table, fh, compression=COMPRESSION, row_group_size=ROW_GROUP_ROWS)


def copy_temp_shard(source: Path, path: Path, *, name: Path) -> None:
    """Copy an existing shard file to ``path`` (a temporary name) and fsync it (same guarantees)."""
    with disk_errors(name, what="creating the shard directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
    copy_file_synced(source, path, name=name)


def publish_shard(tmp: Path, final: Path, rows: int) -> dict:
    """Rename into place (caller holds the store lock) and return the manifest entry."""
    entry = {"path": f"{SHARD_DIR}/{final.name}", "rows": rows, "bytes": tmp.stat().st_size,
             "sha256": file_sha256(tmp)}
    replace_synced(tmp, final)
    return entry


def check_shard(root: Path, entry: dict, *, verify: bool) -> pq.ParquetFile:
    """Existence, size, sha256 (if ``verify``), Parquet footer, row count and schema of one shard."""
    path = root / entry["path"]
    if not path.is_file():
        raise StoreError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise StoreError(f"{path}: shard is truncated or altered ({size} bytes, manifest says {entry['bytes']})")
    if verify and file_sha256(path) != entry["sha256"]:
        raise StoreError(f"{path}: shard checksum mismatch (sha256 differs from the manifest): corrupt")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: unreadable Parquet footer ({exc})") from None
    if pf.metadata.num_rows != entry["rows"]:
        raise StoreError(f"{path}: shard has {pf.metadata.num_rows} rows, manifest says {entry['rows']}")
    arrow = pf.schema_arrow
    for f in BASE_FIELDS + TOKEN_FIELDS:
        idx = arrow.get_field_index(f.name)
        if (idx < 0 and f.name not in TOKEN_COLUMNS) or (idx >= 0 and not arrow.field(idx).type.equals(f.type)):
            found = "absent" if idx < 0 else str(arrow.field(idx).type)
            raise StoreError(f"{path}: column {f.name} is {found}, expected {f.type}")
    return pf


def iter_row_groups(path: Path, pf: pq.ParquetFile, columns: list[str] | None = None):
    """(position of its first row, table) of each row group of an opened shard, in order: memory stays at one
    row group (64 rows) whatever the shard's size."""
    first = 0
    for group in range(pf.num_row_groups):
        table = read_groups(path, pf, [group], columns)
        yield first, table
        first += table.num_rows


def read_groups(path: Path, pf: pq.ParquetFile, groups: list[int], columns: list[str] | None) -> pa.Table:
    """Read row groups of an opened shard; a decoding failure names the shard."""
    try:
        return pf.read_row_groups(groups, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: unreadable Parquet data ({exc})") from None


def conform_table(table: pa.Table) -> pa.Table:
    """A shard table built in bulk with exactly the shard schema's columns, types and no nulls (the values are
    checked by :func:`dpocache.artifacts.validate.check_rows`)."""
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

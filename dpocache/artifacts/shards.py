"""Shard schema, row validation and atomic shard files."""

from __future__ import annotations

import math
import os
import socket
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpocache.artifacts.identity import file_sha256
from dpocache.artifacts.manifest import StoreError, fsync_dir

SHARD_DIR = "shards"
TOKEN_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")

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
TOKEN_FIELDS = [pa.field(name, pa.list_(pa.float32())) for name in TOKEN_COLUMNS]
VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens")


def schema(with_token_logps: bool) -> pa.Schema:
    return pa.schema(BASE_FIELDS + (TOKEN_FIELDS if with_token_logps else []))


def validate_row(row: dict) -> None:
    """Refuse a malformed row with a message naming the example hash and the defect."""
    name = row.get("hash", "<no hash>")
    missing = [f.name for f in BASE_FIELDS if f.name not in row]
    if missing:
        raise StoreError(f"row {name}: missing column(s) {', '.join(missing)}")
    if not isinstance(row["hash"], str) or not row["hash"]:
        raise StoreError(f"row {name}: hash must be a non-empty string")
    for side in ("chosen", "rejected"):
        ids, mask = row[f"{side}_input_ids"], row[f"{side}_mask"]
        if len(ids) != len(mask):
            raise StoreError(f"row {name}: {side} mask length {len(mask)} != ids length {len(ids)}")
        value, count = row[f"ref_{side}_logps"], row[f"ref_{side}_tokens"]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise StoreError(f"row {name}: ref_{side}_logps is not a finite number ({value!r})")
        if value > 1e-6:
            raise StoreError(f"row {name}: ref_{side}_logps = {value} > 0 is not a log-probability sum")
        if int(count) != int(sum(mask)):
            raise StoreError(f"row {name}: ref_{side}_tokens {count} != trainable tokens in mask {sum(mask)}")
        tok = row.get(f"ref_{side}_token_logps")
        if tok is not None and len(tok) != len(ids):
            raise StoreError(f"row {name}: ref_{side}_token_logps length {len(tok)} != ids length {len(ids)}")


def new_shard_name() -> str:
    return f"shard-{uuid.uuid4().hex}.parquet"


def temp_name(final: str) -> str:
    return f".tmp-{socket.gethostname()}-{os.getpid()}-{final}"


def write_shard_file(root: Path, rows: list[dict]) -> tuple[Path, Path]:
    """Write rows to a temporary file in ``shards/`` (fsynced). Returns (temp path, final path)."""
    with_tok = any(r.get(TOKEN_COLUMNS[0]) is not None for r in rows)
    sch = schema(with_tok)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in sch} for r in rows], schema=sch)
    shard_dir = root / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    final = shard_dir / new_shard_name()
    tmp = shard_dir / temp_name(final.name)
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    return tmp, final


def publish_shard(root: Path, tmp: Path, final: Path, rows: int) -> dict:
    """Rename into place (caller holds the store lock) and return the manifest entry."""
    entry = {"path": f"{SHARD_DIR}/{final.name}", "rows": rows, "bytes": tmp.stat().st_size,
             "sha256": file_sha256(tmp)}
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return entry


def check_shard(root: Path, entry: dict, *, verify: bool) -> Path:
    """Existence, size and (if ``verify``) sha256 of one shard; a clear error naming it otherwise."""
    path = root / entry["path"]
    if not path.is_file():
        raise StoreError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise StoreError(f"{path}: shard is truncated or altered ({size} bytes, manifest says {entry['bytes']})")
    if verify and file_sha256(path) != entry["sha256"]:
        raise StoreError(f"{path}: shard checksum mismatch (sha256 differs from the manifest): corrupt")
    return path


def read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{path}: unreadable Parquet shard ({exc})") from None

"""Reading raw rows from local files, save_to_disk folders and the Hugging Face Hub.

Every row comes with a label that locates it for error messages: ``line N`` for JSONL, ``row N``
(1-based) otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from dpocache.data.errors import DataError

Row = tuple[str, object]


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), None, f"not UTF-8 text, so not JSON Lines ({exc.reason} at byte {exc.start})",
                        reason="not_json") from None
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield f"line {i + 1}", json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last and not text.endswith("\n"):
                defect = f"truncated last line (incomplete JSON: {exc.msg})"
                raise DataError(str(path), f"line {i + 1}", defect, reason="truncated_line") from None
            raise DataError(str(path), f"line {i + 1}", f"not valid JSON ({exc.msg} at column {exc.colno})",
                            reason="invalid_json") from None


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # Many ".json" files are really JSON Lines.
        try:
            yield from _jsonl_rows(path)
            return
        except DataError:
            raise DataError(str(path), None, f"not a JSON document nor JSON Lines ({exc})", reason="not_json") \
                from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), None, "expected a JSON array of rows (or an object holding one array)",
                            reason="not_json")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(str(path), None, "expected a JSON array of rows", reason="not_json")
    for i, row in enumerate(data):
        yield f"row {i + 1}", row


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(str(path), None, f"not a Parquet file ({exc})", reason="not_parquet") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row


def _datasets_rows(ds, label: str) -> Iterator[Row]:
    for i, row in enumerate(ds):
        yield f"row {i + 1}", row


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "not fetched"
        offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes")
                      for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "the machine is offline" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise DataError(name, None, f"could not fetch this dataset from the Hugging Face Hub ({why}). "
                        "Download it where the hub is reachable and pass a local path (.jsonl, .json, .parquet "
                        "or a save_to_disk folder) instead.", reason="unavailable") from None
    yield from _datasets_rows(ds, name)


def read_source(source: str, split: str = "train") -> Iterator[Row]:
    """Yield (row label, raw row) for one source."""
    path = Path(source).expanduser()
    if path.is_dir():
        import datasets

        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(source, None, f"no split {split!r} (splits: {', '.join(ds)})",
                                    reason="unavailable")
                ds = ds[split]
            yield from _datasets_rows(ds, source)
            return
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet")
                       and split in p.stem)
        if not files:
            raise DataError(source, None, f"folder has no save_to_disk dataset nor *{split}*.jsonl/.json/.parquet "
                            "files", reason="unavailable")
        for f in files:
            yield from read_source(str(f), split)
        return
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_rows(path)
        elif suffix == ".json":
            yield from _json_rows(path)
        elif suffix == ".parquet":
            yield from _parquet_rows(path)
        else:
            raise DataError(source, None, f"unsupported file type {suffix!r} (use .jsonl, .json or .parquet)",
                            reason="unsupported")
        return
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")) or \
            source.count("/") != 1:
        raise DataError(source, None, "no such file or folder (and not a hub name of the form org/name)",
                        reason="unavailable")
    yield from _hub_rows(source, split)

"""Reading raw rows from local files, ``save_to_disk`` folders and the Hugging Face Hub.

Every row comes with a label that locates it in error messages: ``line N`` for JSON Lines (the
physical line number, blank lines included), ``row N`` (1-based) otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from dpocache.data.errors import DataError

Row = tuple[str, object]
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """Stream a JSON Lines file line by line, so every defect names its exact line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(str(path), f"line {number}", f"not UTF-8 text ({exc.reason} at byte {exc.start}), "
                                "so not JSON Lines", reason="not_json") from None
            try:
                yield f"line {number}", json.loads(text)
            except json.JSONDecodeError as exc:
                if not raw.endswith(b"\n") and not fh.read(1):
                    raise DataError(str(path), f"line {number}", f"truncated last line (incomplete JSON: {exc.msg} "
                                    f"at column {exc.colno})", reason="truncated_line") from None
                raise DataError(str(path), f"line {number}", f"not valid JSON ({exc.msg} at column {exc.colno})",
                                reason="invalid_json") from None


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSON array of rows, an object holding exactly one array of rows, or JSON Lines named .json."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        first = _first_line(path)
        if first is None or not first.lstrip().startswith("{"):
            raise DataError(str(path), None, f"not a JSON document ({exc})", reason="not_json") from None
        yield from _jsonl_rows(path)  # many ".json" files are really JSON Lines
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), None, "expected a JSON array of rows (or an object holding one array of "
                            f"rows); found an object with keys {sorted(data)[:10]}", reason="not_json")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(str(path), None, f"expected a JSON array of rows, got a {type(data).__name__}",
                        reason="not_json")
    for i, row in enumerate(data):
        yield f"row {i + 1}", row


def _first_line(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return line
    except UnicodeDecodeError:
        return None
    return None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), None, f"not a Parquet file ({exc})", reason="not_parquet") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"row {n}", row


def _dataset_rows(ds) -> Iterator[Row]:
    for i, row in enumerate(ds):
        yield f"row {i + 1}", row


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_rows(name: str, split: str, cache_dir: str | None) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - hub/network failures come in many types
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        why = "offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and it is not in the local cache" if _offline() \
            else f"{type(exc).__name__}: {first}"
        raise DataError(name, None, f"could not fetch this dataset from the Hugging Face Hub ({why}). Download it "
                        "where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR)) and pass the "
                        "local path (.jsonl, .json, .parquet or the save_to_disk folder) instead.",
                        reason="unavailable") from None
    yield from _dataset_rows(ds)


def _folder_rows(path: Path, source: str, split: str) -> Iterator[Row]:
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged folder raises many types
            raise DataError(source, None, f"not a readable save_to_disk folder ({type(exc).__name__}: {exc})",
                            reason="unavailable") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(source, None, f"no split {split!r} (splits: {', '.join(ds)}); see "
                                "--mixer_list_splits", reason="unavailable")
            ds = ds[split]
        yield from _dataset_rows(ds)
        return
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES and split in p.stem)
    if not files:
        raise DataError(source, None, f"the folder holds neither a save_to_disk dataset nor *{split}*.jsonl/.json/"
                        ".parquet files", reason="unavailable")
    for f in files:
        yield from read_source(str(f), split)


def looks_like_path(source: str) -> bool:
    """True when ``source`` can only be meant as a local path (hub names are ``name`` or ``org/name``)."""
    return (source.startswith((".", "/", "~")) or source.lower().endswith(LOCAL_SUFFIXES) or "\\" in source
            or source.count("/") > 1)


def read_source(source: str, split: str = "train", cache_dir: str | None = None) -> Iterator[Row]:
    """Yield (row label, raw row) for one source: a local file or folder, else a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _folder_rows(path, source, split)
        return
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
        if suffix not in readers:
            raise DataError(source, None, f"unsupported file type {suffix or '(none)'!r}: use .jsonl, .json or "
                            ".parquet, or a save_to_disk folder", reason="unsupported")
        yield from readers[suffix](path)
        return
    if looks_like_path(source):
        raise DataError(source, None, "no such file or folder", reason="unavailable")
    yield from _hub_rows(source, split, cache_dir)

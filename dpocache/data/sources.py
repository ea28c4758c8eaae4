"""Reading raw rows from local files, ``save_to_disk`` folders and the Hugging Face Hub.

Every row comes with a label that locates it in error messages: ``line N`` for JSON Lines (the
physical line number, blank lines included), ``row N`` (1-based) otherwise.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path
from typing import Iterator

from dpocache.data.errors import DataError

Row = tuple[str, object]
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz")  # JSON and JSON Lines files may be compressed (file.jsonl.gz)


def _open(path: Path, mode: str = "rb", **kwargs):
    """Open a file, decompressing ``.gz``/``.bz2``/``.xz`` on the fly (standard library)."""
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix.lower(), open)
    return opener(path, mode, **kwargs)


def file_kind(path: Path) -> str:
    """``.jsonl``, ``.json`` or ``.parquet`` (a compression suffix looked through), else the raw suffix."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        inner = suffixes[-2] if len(suffixes) > 1 else ""
        return inner if inner in (".jsonl", ".json") else "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """Stream a JSON Lines file line by line, so every defect names its exact line.

    A line that cannot be parsed is yielded as a :class:`DataError` in place of the row, so that the
    caller can stop or (``--on_bad_row skip``) count it and read on.
    """
    number = 0
    try:
        with _open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark (files saved by some editors and spreadsheet tools)
                if not raw.strip():
                    continue
                yield f"line {number}", _parse_line(path, number, raw, fh)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(str(path), f"line {number + 1}", f"the file cannot be read on ({type(exc).__name__}: {exc})",
                        reason="unreadable") from None


def _parse_line(path: Path, number: int, raw: bytes, fh) -> object:
    where = f"line {number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DataError(str(path), where, f"not UTF-8 text ({exc.reason} at byte {exc.start}), so not JSON Lines",
                         reason="not_json")
    try:
        return json.loads(text)
    except RecursionError:
        return DataError(str(path), where, "JSON nested too deeply to parse", reason="invalid_json")
    except json.JSONDecodeError as exc:
        if not raw.endswith(b"\n") and not fh.read(1):
            return DataError(str(path), where, f"truncated last line (incomplete JSON: {exc.msg} at column "
                             f"{exc.colno})", reason="truncated_line")
        return DataError(str(path), where, f"not valid JSON ({exc.msg} at column {exc.colno})",
                         reason="invalid_json")


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSON array of rows, an object holding exactly one array of rows, or JSON Lines named .json."""
    try:
        with _open(path, "rt", encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except RecursionError:
        raise DataError(str(path), None, "JSON nested too deeply to parse", reason="not_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError, lzma.LZMAError) as exc:
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
        with _open(path, "rt", encoding="utf-8-sig") as fh:
            for line in fh:
                if line.strip():
                    return line
    except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError):
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
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(str(path), f"row {n + 1}", f"the Parquet data cannot be read on ({exc})",
                        reason="unreadable") from None


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
    for f in _split_files(path, source, split):
        yield from read_source(str(f), split)


def _split_files(path: Path, source: str, split: str) -> list[Path]:
    """The data files of ``split`` in a folder of files (a downloaded dataset repository, say), found by
    the Hugging Face naming conventions ``datasets`` uses: ``train.jsonl``, ``data/train-00000-of-00002.parquet``,
    ``test_prefs/*.json.gz``..., or every file as ``train`` when no name says a split."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(path))
    except Exception:  # noqa: BLE001 - datasets raises its own EmptyDatasetError (and others) for no files
        patterns = {}

    def matches(pattern: str) -> list[str]:
        try:
            return resolve_pattern(pattern, str(path))
        except FileNotFoundError:  # one pattern of the split's group matches nothing: the others may
            return []

    by_split = {name: sorted({Path(f) for pat in pats for f in matches(pat) if file_kind(Path(f)) in LOCAL_SUFFIXES})
                for name, pats in patterns.items()}
    by_split = {name: files for name, files in by_split.items() if files}
    if not by_split:
        raise DataError(source, None, "the folder holds neither a save_to_disk dataset nor .jsonl/.json/.parquet "
                        "data files (compressed .gz/.bz2/.xz JSON too)", reason="unavailable")
    if split not in by_split:
        raise DataError(source, None, f"no data files for split {split!r} (splits found by file name: "
                        f"{', '.join(sorted(by_split))}); see --mixer_list_splits", reason="unavailable")
    return by_split[split]


def looks_like_path(source: str) -> bool:
    """True when ``source`` can only be meant as a local path (hub names are ``name`` or ``org/name``)."""
    return (source.startswith((".", "/", "~")) or file_kind(Path(source)) in LOCAL_SUFFIXES or "\\" in source
            or source.count("/") > 1)


def read_source(source: str, split: str = "train", cache_dir: str | None = None) -> Iterator[Row]:
    """Yield (row label, raw row) for one source: a local file or folder, else a hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _folder_rows(path, source, split)
        return
    if path.is_file():
        kind = file_kind(path)
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
        if kind not in readers:
            raise DataError(source, None, f"unsupported file type {kind or '(none)'!r}: use .jsonl, .json or "
                            ".parquet (JSON also compressed: .gz, .bz2, .xz), or a dataset folder",
                            reason="unsupported")
        yield from readers[kind](path)
        return
    if looks_like_path(source):
        raise DataError(source, None, "no such file or folder", reason="unavailable")
    yield from _hub_rows(source, split, cache_dir)

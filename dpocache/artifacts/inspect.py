"""`dpocache inspect`: which reference scored a store, what it holds, and whether every byte and row is intact.

The report starts with the reference (model, revision, tokenizer, dtype, backend, dates, library versions),
then shards, rows, lists (with their roles) and statistics. Shards are read one row group at a time, so
memory stays at one row group plus a few numbers per row, whatever the store's size. ``verify`` checks
every shard's and list's sha256 and runs :func:`~dpocache.artifacts.validate.check_rows` (the checks every
reader, stage two included, runs) over every row, with the values of examples stored more than once
compared across shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpocache.artifacts.cleanup import orphan_files
from dpocache.artifacts.lists import list_role, read_list_file, role_word
from dpocache.artifacts.manifest import STORE_FORMAT_VERSION, Manifest, StoreError, read_manifest
from dpocache.artifacts.shards import TOKEN_COLUMNS, check_shard, iter_row_groups, read_groups
from dpocache.artifacts.validate import Duplicates, check_rows

_STAT_COLUMNS = ["hash", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens",
                 "chosen_input_ids", "rejected_input_ids"]
_DEFECTS_SHOWN = 20  # row defects listed in a report (all are counted)
_NOT_LIBRARIES = {"model_name", "model_revision", "tokenizer_name", "chat_template", "pad_token"}


def _stats(values: list[np.ndarray]) -> dict:
    arr = np.concatenate(values) if values else np.array([])
    if arr.size == 0:
        return {}
    return {"mean": float(arr.mean()), "min": float(arr.min()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def reference_summary(manifest: Manifest) -> dict:
    """Who scored the store: model, revision, tokenizer, dtype, backend, dates and library versions."""
    ident, info = manifest.identity, manifest.versions
    return {"model": info.get("model_name"), "revision": info.get("model_revision"),
            "tokenizer": info.get("tokenizer_name") or info.get("model_name"),
            "dtype": ident.get("dtype"), "backend": ident.get("backend"),
            "max_seq_length": ident.get("max_seq_length"), "weights_sha256": ident.get("model_weights_sha256"),
            "created_at": manifest.created_at, "scored_at": manifest.scored_at,
            "libraries": {k: v for k, v in info.items() if k not in _NOT_LIBRARIES}}


class _Accumulator:
    """Per-row numbers for the statistics, and the row defects found (first ``_DEFECTS_SHOWN`` kept)."""

    def __init__(self):
        self.columns: dict[str, list[np.ndarray]] = {c: [] for c in _STAT_COLUMNS[1:5]}
        self.columns.update(chosen_length=[], rejected_length=[])
        self.defects: list = []
        self.defect_count = 0

    def add(self, table: pa.Table) -> None:
        for col in _STAT_COLUMNS[1:5]:
            self.columns[col].append(table.column(col).to_numpy())
        for side in ("chosen", "rejected"):
            lengths = pc.list_value_length(table.column(f"{side}_input_ids")).to_numpy(zero_copy_only=False)
            self.columns[f"{side}_length"].append(lengths)

    def add_defects(self, defects: list) -> None:
        self.defect_count += len(defects)
        self.defects += defects[: max(0, _DEFECTS_SHOWN - len(self.defects))]


def _check_shards(root: Path, manifest: Manifest, verify: bool) -> tuple[list[dict], list[pa.ChunkedArray]]:
    """Check every shard (size, footer, row count, schema; sha256 when ``verify``) and read its hashes (one file
    open at a time)."""
    infos, hashes = [], []
    for entry in manifest.shards:
        info = {"path": entry["path"], "rows": entry["rows"], "bytes": entry.get("bytes"), "ok": True}
        try:
            with check_shard(root, entry, verify=verify) as pf:
                info["token_logps"] = all(c in pf.schema_arrow.names for c in TOKEN_COLUMNS)
                hashes.append(read_groups(root / entry["path"], pf, list(range(pf.num_row_groups)), ["hash"])
                              .column("hash"))
        except (StoreError, OSError) as exc:
            info.update(ok=False, problem=str(exc))
        infos.append(info)
    return infos, hashes


def _read_rows(root: Path, shards: list[dict], verify: bool, duplicated: set[str], acc: _Accumulator) -> None:
    """Statistics (and with ``verify``, :func:`check_rows`) over every row group of every sound shard."""
    seen = Duplicates(track=duplicated)
    for info in shards:
        if not info["ok"]:
            continue
        path = root / info["path"]
        found = 0
        try:
            with pq.ParquetFile(path) as pf:
                for first, table in iter_row_groups(path, pf, None if verify else _STAT_COLUMNS):
                    if verify:
                        defects = check_rows(table, shard=str(path), first_row=first, duplicates=seen)
                        found += len(defects)
                        acc.add_defects(defects)
                    acc.add(table)
        except (StoreError, pa.ArrowException, OSError) as exc:
            info.update(ok=False, problem=str(exc) if isinstance(exc, StoreError) else f"{path}: unreadable ({exc})")
        if found:
            info.update(ok=False, defects=found)


def _inspect_lists(root: Path, manifest: Manifest, verify: bool, problems: list[str]) -> dict:
    out = {}
    for name, entry in sorted(manifest.lists.items()):
        item = {"count": entry["count"], "role": list_role(entry), "path": entry["path"], "ok": True}
        try:
            read_list_file(root, name, entry, verify=verify)
        except (StoreError, OSError) as exc:
            item["ok"] = False
            problems.append(str(exc))
        out[name] = item
    return out


def inspect_store(path, *, verify: bool = False, dataset_hashes: list[str] | None = None) -> dict:
    """A JSON-serialisable report of a store. ``verify`` checks every shard's and list's sha256 and every row
    (:func:`check_rows`); Parquet footers, sizes and row counts are always checked. ``ok`` is False when
    anything fails; ``problems`` names each failure (shard, row and example for a bad row)."""
    root = Path(path)
    manifest = read_manifest(root)
    shards, hash_columns = _check_shards(root, manifest, verify)
    counts = pc.value_counts(pa.chunked_array(hash_columns, pa.string()))
    unique, repeats = counts.field("values"), counts.field("counts")
    duplicated = set(pc.filter(unique, pc.greater(repeats, 1)).to_pylist())
    acc = _Accumulator()
    _read_rows(root, shards, verify, duplicated, acc)
    problems = [s["problem"] for s in shards if "problem" in s] + [str(d) for d in acc.defects]
    if acc.defect_count > len(acc.defects):
        problems.append(f"... and {acc.defect_count - len(acc.defects)} more bad row(s)")
    lists = _inspect_lists(root, manifest, verify, problems)
    report: dict = {
        "reference": reference_summary(manifest),
        "store": str(root), "format_version": STORE_FORMAT_VERSION, "verified": verify,
        "identity": manifest.identity, "versions": manifest.versions,
        "shards": shards, "rows": sum(int(s["rows"]) for s in manifest.shards),
        "unique_examples": len(unique), "duplicate_rows": int(pc.sum(repeats).as_py() or 0) - len(unique),
        "bytes": sum(int(s.get("bytes") or 0) for s in manifest.shards),
        "token_logps_shards": sum(1 for s in shards if s.get("token_logps")),
        "lists": lists, "orphan_files": orphan_files(root, manifest),
        "statistics": {"ref_chosen_logps": _stats(acc.columns["ref_chosen_logps"]),
                       "ref_rejected_logps": _stats(acc.columns["ref_rejected_logps"]),
                       "chosen_trainable_tokens": _stats(acc.columns["ref_chosen_tokens"]),
                       "rejected_trainable_tokens": _stats(acc.columns["ref_rejected_tokens"]),
                       "chosen_length": _stats(acc.columns["chosen_length"]),
                       "rejected_length": _stats(acc.columns["rejected_length"])},
        "bad_rows": acc.defect_count, "defects": [d.to_json() for d in acc.defects],
        "problems": problems, "ok": not problems,
    }
    if dataset_hashes is not None:
        present = int(pc.sum(pc.is_in(pa.array(dataset_hashes, pa.string()), value_set=unique)).as_py() or 0)
        report["coverage"] = {"examples": len(dataset_hashes), "present": present,
                              "missing": len(dataset_hashes) - present}
    return report


def _reference_lines(ref: dict) -> list[str]:
    revision = f" (revision {ref['revision']})" if ref.get("revision") else ""
    lines = [f"reference: {ref.get('model') or 'unknown model'}{revision}; dtype {ref.get('dtype')}, backend "
             f"{ref.get('backend')}, max_seq_length {ref.get('max_seq_length')}"]
    if ref.get("tokenizer") and ref.get("tokenizer") != ref.get("model"):
        lines.append(f"tokenizer: {ref['tokenizer']}")
    lines.append(f"scored: created {ref.get('created_at') or 'unknown'}, rows last added "
                 f"{ref.get('scored_at') or 'unknown'} (UTC)")
    if ref.get("libraries"):
        lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in ref["libraries"].items()))
    return lines


def format_inspect(report: dict) -> str:
    """The human-readable form of :func:`inspect_store`'s report (the reference first)."""
    status = "OK" if report["ok"] else "PROBLEMS FOUND"
    checked = ("checksums and rows verified" if report.get("verified")
               else "checksums and rows not verified (use --verify)")
    lines = _reference_lines(report["reference"])
    lines.append(f"store: {report['store']}  (format {report['format_version']}; {status}; {checked})")
    lines.append("identity:")
    lines += [f"  {k}: {v}" for k, v in sorted(report["identity"].items())]
    lines.append(f"shards: {len(report['shards'])}, rows: {report['rows']}, unique examples: "
                 f"{report['unique_examples']}, bytes: {report['bytes']:,}")
    if report["rows"]:
        lines.append(f"bytes per example: {report['bytes'] / report['rows']:.0f}; shards with per-token "
                     f"log-probs: {report['token_logps_shards']}/{len(report['shards'])}")
    if report["duplicate_rows"]:
        lines.append(f"duplicate rows (same example in several rows): {report['duplicate_rows']}")
    lines.append("lists:" if report["lists"] else "lists: none")
    lines += [f"  {name}: {item['count']} examples ({role_word(item['role'])})" + ("" if item["ok"] else "  (BAD)")
              for name, item in sorted(report["lists"].items())]
    for key, st in report["statistics"].items():
        if st:
            lines.append(f"{key}: mean {st['mean']:.2f}, min {st['min']:.2f}, p50 {st['p50']:.2f}, "
                         f"p95 {st['p95']:.2f}, max {st['max']:.2f}")
    if "coverage" in report:
        cov = report["coverage"]
        lines.append(f"coverage: {cov['present']}/{cov['examples']} present, {cov['missing']} missing")
    if report["orphan_files"]:
        lines.append(f"files not in the manifest (in-flight or orphaned; orphans go on the next write): "
                     f"{len(report['orphan_files'])}")
    if report.get("bad_rows"):
        lines.append(f"bad rows: {report['bad_rows']}")
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)

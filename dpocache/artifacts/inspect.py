"""`dpocache inspect`: what a store holds, and whether every byte of it is intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from dpocache.artifacts.cleanup import orphan_files
from dpocache.artifacts.lists import read_list_file
from dpocache.artifacts.manifest import STORE_FORMAT_VERSION, StoreError, read_manifest
from dpocache.artifacts.shards import TOKEN_COLUMNS, check_shard, read_groups

_STAT_COLUMNS = ["hash", "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens",
                 "chosen_input_ids", "rejected_input_ids"]


def _stats(values: list[np.ndarray]) -> dict:
    arr = np.concatenate(values) if values else np.array([])
    if arr.size == 0:
        return {}
    return {"mean": float(arr.mean()), "min": float(arr.min()), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def _inspect_shard(root: Path, entry: dict, verify: bool, acc: dict) -> dict:
    """Check one shard and accumulate its statistics; returns its report line."""
    info = {"path": entry["path"], "rows": entry["rows"], "bytes": entry.get("bytes"), "ok": True}
    try:
        pf = check_shard(root, entry, verify=verify)
        info["token_logps"] = all(c in pf.schema_arrow.names for c in TOKEN_COLUMNS)
        table = read_groups(root / entry["path"], pf, list(range(pf.num_row_groups)), _STAT_COLUMNS)
    except (StoreError, OSError) as exc:
        info.update(ok=False, problem=str(exc))
        return info
    acc["hashes"].extend(table.column("hash").to_pylist())
    for col in _STAT_COLUMNS[1:5]:
        acc[col].append(table.column(col).to_numpy())
    for side in ("chosen", "rejected"):
        acc[f"{side}_length"].append(pc.list_value_length(table.column(f"{side}_input_ids")).to_numpy())
    return info


def _inspect_lists(root: Path, manifest, verify: bool, problems: list[str]) -> dict:
    out = {}
    for name, entry in sorted(manifest.lists.items()):
        item = {"count": entry["count"], "path": entry["path"], "ok": True}
        try:
            read_list_file(root, name, entry, verify=verify)
        except (StoreError, OSError) as exc:
            item["ok"] = False
            problems.append(str(exc))
        out[name] = item
    return out


def inspect_store(path, *, verify: bool = False, dataset_hashes: list[str] | None = None) -> dict:
    """A JSON-serialisable report of a store. ``verify`` checks every shard's sha256 and every list's;
    Parquet footers, sizes and row counts are always checked. ``ok`` is False when anything fails."""
    root = Path(path)
    manifest = read_manifest(root)
    acc: dict = {"hashes": [], **{c: [] for c in _STAT_COLUMNS[1:5]}, "chosen_length": [], "rejected_length": []}
    shards = [_inspect_shard(root, entry, verify, acc) for entry in manifest.shards]
    problems = [s["problem"] for s in shards if not s["ok"]]
    lists = _inspect_lists(root, manifest, verify, problems)
    unique = set(acc["hashes"])
    report: dict = {
        "store": str(root), "format_version": STORE_FORMAT_VERSION, "verified": verify,
        "identity": manifest.identity, "versions": manifest.versions,
        "shards": shards, "rows": sum(int(s["rows"]) for s in manifest.shards),
        "unique_examples": len(unique), "duplicate_rows": len(acc["hashes"]) - len(unique),
        "bytes": sum(int(s.get("bytes") or 0) for s in manifest.shards),
        "token_logps_shards": sum(1 for s in shards if s.get("token_logps")),
        "lists": lists, "orphan_files": orphan_files(root, manifest),
        "statistics": {"ref_chosen_logps": _stats(acc["ref_chosen_logps"]),
                       "ref_rejected_logps": _stats(acc["ref_rejected_logps"]),
                       "chosen_trainable_tokens": _stats(acc["ref_chosen_tokens"]),
                       "rejected_trainable_tokens": _stats(acc["ref_rejected_tokens"]),
                       "chosen_length": _stats(acc["chosen_length"]),
                       "rejected_length": _stats(acc["rejected_length"])},
        "problems": problems, "ok": not problems,
    }
    if dataset_hashes is not None:
        present = sum(1 for h in dataset_hashes if h in unique)
        report["coverage"] = {"examples": len(dataset_hashes), "present": present,
                              "missing": len(dataset_hashes) - present}
    return report


def format_inspect(report: dict) -> str:
    """The human-readable form of :func:`inspect_store`'s report."""
    status = "OK" if report["ok"] else "PROBLEMS FOUND"
    checked = "checksums verified" if report.get("verified") else "checksums not verified (use --verify)"
    lines = [f"store: {report['store']}  (format {report['format_version']}; {status}; {checked})", "identity:"]
    lines += [f"  {k}: {v}" for k, v in sorted(report["identity"].items())]
    lines.append(f"shards: {len(report['shards'])}, rows: {report['rows']}, unique examples: "
                 f"{report['unique_examples']}, bytes: {report['bytes']:,}")
    if report["rows"]:
        lines.append(f"bytes per example: {report['bytes'] / report['rows']:.0f}; shards with per-token "
                     f"log-probs: {report['token_logps_shards']}/{len(report['shards'])}")
    if report["duplicate_rows"]:
        lines.append(f"duplicate rows (same example in several shards): {report['duplicate_rows']}")
    lines.append("lists:" if report["lists"] else "lists: none")
    lines += [f"  {name}: {item['count']} examples" + ("" if item["ok"] else "  (BAD)")
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
    lines += [f"PROBLEM: {problem}" for problem in report["problems"]]
    return "\n".join(lines)

"""`dpocache inspect`: what a store holds, and whether every byte of it is intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpocache.artifacts.manifest import StoreError, read_manifest, safe_relpath
from dpocache.artifacts.shards import check_shard


def _stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {}
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max()),
            "p50": float(np.percentile(values, 50))}


def inspect_store(path, *, verify: bool = False, dataset_hashes: list[str] | None = None) -> dict:
    """A JSON-serialisable report; ``ok`` is False when any shard or list fails its checks."""
    root = Path(path)
    manifest = read_manifest(root)
    report: dict = {"store": str(root), "ok": True, "identity": manifest.identity,
                    "versions": manifest.versions, "shards": [], "problems": []}
    hashes: set[str] = set()
    chosen_lp, rejected_lp, chosen_len, rejected_len = [], [], [], []
    for entry in manifest.shards:
        info = {"path": entry["path"], "rows": entry["rows"], "bytes": entry.get("bytes")}
        try:
            shard_path = check_shard(root, entry, verify=verify)
            if verify:
                meta = pq.ParquetFile(shard_path).metadata
                if meta.num_rows != entry["rows"]:
                    raise StoreError(f"{shard_path}: {meta.num_rows} rows, manifest says {entry['rows']}")
            table = pq.read_table(shard_path, columns=["hash", "ref_chosen_logps", "ref_rejected_logps",
                                                       "chosen_input_ids", "rejected_input_ids"])
            hashes.update(table.column("hash").to_pylist())
            chosen_lp.append(table.column("ref_chosen_logps").to_numpy())
            rejected_lp.append(table.column("ref_rejected_logps").to_numpy())
            chosen_len.append(pc.list_value_length(table.column("chosen_input_ids")).to_numpy())
            rejected_len.append(pc.list_value_length(table.column("rejected_input_ids")).to_numpy())
            info["ok"] = True
        except (StoreError, OSError, ValueError) as exc:
            info["ok"] = False
            report["ok"] = False
            report["problems"].append(str(exc))
        report["shards"].append(info)
    report["rows"] = sum(int(s["rows"]) for s in manifest.shards)
    report["unique_examples"] = len(hashes)
    report["bytes"] = sum(int(s.get("bytes") or 0) for s in manifest.shards)
    report["lists"] = {}
    for name, entry in manifest.lists.items():
        item = {"count": entry.get("count")}
        list_path = safe_relpath(root, entry["path"], what="list")
        if not list_path.is_file():
            item["ok"] = False
            report["ok"] = False
            report["problems"].append(f"{list_path}: example list file is missing")
        report["lists"][name] = item

    def cat(xs):
        return np.concatenate(xs) if xs else np.array([])

    report["statistics"] = {
        "ref_chosen_logps": _stats(cat(chosen_lp)), "ref_rejected_logps": _stats(cat(rejected_lp)),
        "chosen_tokens": _stats(cat(chosen_len)), "rejected_tokens": _stats(cat(rejected_len)),
    }
    if dataset_hashes is not None:
        present = sum(1 for h in dataset_hashes if h in hashes)
        report["coverage"] = {"examples": len(dataset_hashes), "present": present,
                              "missing": len(dataset_hashes) - present}
    return report


def format_inspect(report: dict) -> str:
    lines = [f"store: {report['store']}  ({'OK' if report['ok'] else 'PROBLEMS FOUND'})", "identity:"]
    lines += [f"  {k}: {v}" for k, v in sorted(report["identity"].items())]
    lines.append(f"shards: {len(report['shards'])}, rows: {report['rows']}, unique examples: "
                 f"{report['unique_examples']}, bytes: {report['bytes']:,}")
    if report["rows"]:
        lines.append(f"bytes per example: {report['bytes'] / report['rows']:.0f}")
    lines.append("lists:")
    lines += [f"  {name}: {item['count']} examples" for name, item in sorted(report["lists"].items())]
    for key, st in report["statistics"].items():
        if st:
            lines.append(f"{key}: mean {st['mean']:.2f}, min {st['min']:.2f}, p50 {st['p50']:.2f}, "
                         f"max {st['max']:.2f}")
    if "coverage" in report:
        cov = report["coverage"]
        lines.append(f"coverage: {cov['present']}/{cov['examples']} present, {cov['missing']} missing")
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)

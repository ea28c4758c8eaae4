#!/usr/bin/env python3
"""Store size per example (with and without per-token columns) and read overhead per training batch.

    HF_HUB_OFFLINE=1 python bench/bench_store.py --examples 4000 --length 512

Prints one JSON line. ``read_ms_per_batch`` is the time of ``read_rows`` for one random batch of
``--batch`` examples (the columns training reads), averaged over many batches, on a warm store.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TRAIN_COLUMNS = ["chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask", "ref_chosen_logps",
                 "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens"]


def rows(n: int, length: int, token_logps: bool, rng):
    for i in range(n):
        row = {"hash": f"{i:064x}"}
        for side in ("chosen", "rejected"):
            t = int(rng.integers(length // 2, length))
            ids = rng.integers(0, 128000, t).astype(np.int32)
            mask = np.zeros(t, np.int8)
            mask[t // 3:] = 1
            lp = np.where(mask == 1, -rng.random(t) * 4, 0.0).astype(np.float32)
            row.update({f"{side}_input_ids": ids, f"{side}_mask": mask,
                        f"ref_{side}_logps": float(lp.sum(dtype=np.float64)), f"ref_{side}_tokens": int(mask.sum())})
            if token_logps:
                row[f"ref_{side}_token_logps"] = lp
        yield row


def read_ms_per_batch(path: Path, n: int, batch: int, batches: int) -> dict:
    from dpocache.artifacts import ReferenceStore

    store = ReferenceStore.open(path)
    t0 = time.perf_counter()
    store.hashes()  # opens and verifies every shard (sha256) and builds the index
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for _ in range(batches):
        store.read_rows([f"{i:064x}" for i in rng.choice(n, batch, replace=False)], TRAIN_COLUMNS)
    per_batch = 1000 * (time.perf_counter() - t0) / batches
    t0 = time.perf_counter()
    store.read_rows([f"{i:064x}" for i in rng.permutation(n)], TRAIN_COLUMNS)
    return {"open_and_verify_seconds": round(open_s, 3), "read_ms_per_batch": round(per_batch, 3),
            "load_all_seconds": round(time.perf_counter() - t0, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--length", type=int, default=512, help="maximum tokens per side")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    from dpocache.artifacts import ReferenceStore

    out = {"bench": "store", "examples": args.examples, "max_length": args.length, "batch": args.batch}
    for token_logps in (False, True):
        key = "with_token_logps" if token_logps else "sums_only"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "s"
            with ReferenceStore.create_or_open(path, {"bench": 1}) as store:
                t0 = time.perf_counter()
                with store.writer(rows_per_shard=1024) as w:
                    w.add_many(rows(args.examples, args.length, token_logps, np.random.default_rng(0)))
                write_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in (path / "shards").iterdir())
            out[f"bytes_per_example_{key}"] = round(size / args.examples)
            out[f"write_examples_per_second_{key}"] = round(args.examples / write_s)
            if not token_logps:
                out.update(read_ms_per_batch(path, args.examples, args.batch, args.batches))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

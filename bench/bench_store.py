#!/usr/bin/env python3
"""Store size per example (with and without per-token columns) and read overhead per training batch.

    python bench/bench_store.py --examples 4000 --length 512
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def rows(n: int, length: int, token_logps: bool, rng):
    for i in range(n):
        row = {"hash": f"{i:064x}"}
        for side in ("chosen", "rejected"):
            t = int(rng.integers(length // 2, length))
            ids = rng.integers(0, 128000, t).astype(np.int32).tolist()
            mask = [0] * (t // 3) + [1] * (t - t // 3)
            lp = np.where(np.array(mask, bool), -rng.random(t) * 4, 0.0)
            row.update({f"{side}_input_ids": ids, f"{side}_mask": mask, f"ref_{side}_logps": float(lp.sum()),
                        f"ref_{side}_tokens": int(sum(mask))})
            if token_logps:
                row[f"ref_{side}_token_logps"] = lp.astype(np.float32).tolist()
        yield row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from dpocache.artifacts import ReferenceStore
    from dpocache.stages.train import EXAMPLE_COLUMNS

    out = {"bench": "store", "examples": args.examples, "max_length": args.length}
    for token_logps in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            store = ReferenceStore.create_or_open(Path(tmp) / "s", {"bench": 1})
            t0 = time.perf_counter()
            with store.writer(rows_per_shard=1024) as w:
                w.add_many(rows(args.examples, args.length, token_logps, np.random.default_rng(0)))
            write_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in (Path(tmp) / "s" / "shards").iterdir())
            key = "with_token_logps" if token_logps else "sums_only"
            out[f"bytes_per_example_{key}"] = round(size / args.examples)
            out[f"write_examples_per_second_{key}"] = round(args.examples / write_s)
            if not token_logps:
                reader = ReferenceStore.open(Path(tmp) / "s")
                hashes = [f"{i:064x}" for i in np.random.default_rng(1).permutation(args.examples)]
                t0 = time.perf_counter()
                table, _ = reader.read_rows(hashes, EXAMPLE_COLUMNS)
                load_s = time.perf_counter() - t0
                out["load_all_seconds"] = round(load_s, 3)
                out["read_ms_per_batch"] = round(1000 * load_s / (args.examples / args.batch), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

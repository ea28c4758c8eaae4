#!/usr/bin/env python3
"""Tokenization throughput of the data layer on generated conversational rows (prints one JSON line).

    python bench/bench_tokenize.py --rows 20000
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    args = parser.parse_args()
    from conftest import GGUF_NAME, smollm_gguf_dir
    from transformers import AutoTokenizer

    from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DPOCACHE_HOME"] = tmp
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w") as fh:
            for i in range(args.rows):
                q = " ".join(rng.choice(["what", "is", "the", "best", "way", "to", "learn", "rust", "today"])
                             for _ in range(rng.randint(5, 40)))
                a = " ".join(rng.choice(["you", "should", "read", "the", "book", "and", "practice", "daily"])
                             for _ in range(rng.randint(5, 80)))
                prompt = [{"role": "user", "content": f"{q} ({i})"}]
                fh.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": a}],
                                     "rejected": prompt + [{"role": "assistant", "content": a[::-1]}]}) + "\n")
        tok = AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME)
        cfg = DataConfig(dataset=str(path))
        tok, _ = prepare_tokenizer(tok, cfg)
        t0 = time.perf_counter()
        data = load_preference_data(cfg, tok, progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_preference_data(cfg, tok, progress=False)
        cached = time.perf_counter() - t0
    print(json.dumps({"bench": "tokenize", "rows": args.rows, "examples": len(data.dataset),
                      "seconds": round(first, 2), "rows_per_second": round(args.rows / first, 1),
                      "rerun_seconds_cached": round(cached, 2)}))


if __name__ == "__main__":
    main()

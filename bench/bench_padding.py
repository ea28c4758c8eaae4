#!/usr/bin/env python3
"""Padded-token fraction of random batching vs dpocache's length-grouped batching (prints one JSON line).

The pairs are the synthetic mixed-length set of ``bench_train.py``, tokenized by dpocache's data layer
(SmolLM2 tokenizer, ChatML, truncated to ``--max_length``). Each batch is one concatenated forward of
chosen + rejected, padded to its longest sequence; the fraction is pad tokens / all tokens, over
``--epochs`` epochs of each order (``dpocache.stages.train.batching.epoch_order`` with and without grouping).

    python bench/bench_padding.py            # 2,048 pairs, batch 8, up to 256 tokens
    python bench/bench_padding.py --quick    # 256 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from benchlib import save_tokenizer, save_word_tokenizer, synthetic_rows, write_jsonl


def tokenizer_dir(name: str, work: Path) -> Path:
    """``smollm2`` (SmolLM2's tokenizer from the GGUF), ``words`` (the word-level bench tokenizer) or a path."""
    if name == "smollm2":
        return save_tokenizer(work / "tok")
    if name == "words":
        return save_word_tokenizer(work / "tok")
    return Path(name)


def pair_lengths(pairs: int, max_length: int, work: Path, tokenizer: str) -> tuple[np.ndarray, np.ndarray]:
    """Token counts of chosen and rejected, as dpocache's data layer tokenizes the synthetic pairs."""
    from transformers import AutoTokenizer

    from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer

    data = write_jsonl(work / "pairs.jsonl", synthetic_rows(pairs, seed=0))
    cfg = DataConfig(dataset=str(data), chat_template_name="chatml", max_seq_length=max_length,
                     dataset_cache_dir=str(work / "cache"))
    tok, _ = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir(tokenizer, work)), cfg)
    ds = load_preference_data(cfg, tok, progress=False).dataset
    chosen = np.array([len(x) for x in ds["chosen_input_ids"]])
    rejected = np.array([len(x) for x in ds["rejected_input_ids"]])
    return chosen, rejected


def concatenated_padding(chosen: np.ndarray, rejected: np.ndarray, batches) -> float:
    """Pad tokens / all tokens when each batch of pairs is one forward of 2 x pairs rows."""
    real = total = 0
    for idx in batches:
        width = int(max(chosen[idx].max(), rejected[idx].max()))
        real += int(chosen[idx].sum() + rejected[idx].sum())
        total += 2 * len(idx) * width
    return 1.0 - real / total


def measure(chosen: np.ndarray, rejected: np.ndarray, batch: int, epochs: int, seed: int, grouped: bool) -> float:
    from dpocache.stages.train.batching import epoch_order, micro_batches

    lengths = np.maximum(chosen, rejected)
    batches = []
    for epoch in range(epochs):
        order = epoch_order(lengths, batch, seed, epoch, group_by_length=grouped)
        batches += list(micro_batches(order, batch))
    return concatenated_padding(chosen, rejected, batches)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tokenizer", default="smollm2", help="smollm2 (default), words (a word-level "
                        "tokenizer, fast to build) or a saved tokenizer directory")
    parser.add_argument("--quick", action="store_true", help="256 pairs, 3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.epochs = 256, 3
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DPOCACHE_HOME"] = tmp
        chosen, rejected = pair_lengths(args.pairs, args.max_length, Path(tmp), args.tokenizer)
    naive = measure(chosen, rejected, args.batch, args.epochs, args.seed, grouped=False)
    grouped = measure(chosen, rejected, args.batch, args.epochs, args.seed, grouped=True)
    reduction = 1.0 - grouped / naive
    print(json.dumps({"bench": "padding", "pairs": len(chosen), "batch": args.batch, "max_length": args.max_length,
                      "epochs": args.epochs, "quick": args.quick, "tokenizer": Path(args.tokenizer).name,
                      "mean_tokens_per_sequence": round(float((chosen.mean() + rejected.mean()) / 2), 1),
                      "naive_padded_fraction": round(naive, 4), "grouped_padded_fraction": round(grouped, 4),
                      "grouped_over_naive": round(grouped / naive, 3), "padding_reduction": round(reduction, 3),
                      "targets": {"padding_cut_ge_30pct": reduction >= 0.30}}))


if __name__ == "__main__":
    main()

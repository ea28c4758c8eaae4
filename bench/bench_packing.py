#!/usr/bin/env python3
"""Stage-two training throughput and peak memory, padded vs packed (``--packing``) micro-batches.

A ~7M-parameter Llama (hidden 128, 4 layers, head_dim 64, SmolLM2's 49,152-token vocabulary) is built
once; random preference pairs of mixed length (prompt 16-256 tokens, each reply 8-256) go through the
stage-two micro-batch path (``forward_batch`` + DPO loss + backward + AdamW step) in two orders: random
(``--group_by_length false``) and length-grouped (the default). Each (order, mode) runs in its own process
so that its peak resident memory (``ru_maxrss``) can be measured above the process's baseline after
loading. Tokens/s counts real (non-pad) tokens; ``attention_pairs`` counts the query-key pairs the
attention computes (a dense packed row computes every pair of the row; a varlen kernel only those inside
each sequence). Prints one JSON line.

    python bench/bench_packing.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def make_examples(pairs: int, seed: int = 0):
    from dpocache.stages.train.examples import Examples

    rng = np.random.default_rng(seed)
    ci, cm, ri, rm = [], [], [], []
    for _ in range(pairs):
        prompt = rng.integers(3, 49000, int(rng.integers(16, 257))).tolist()
        for ids, masks in ((ci, cm), (ri, rm)):
            reply = rng.integers(3, 49000, int(rng.integers(8, 257))).tolist()
            ids.append(prompt + reply)
            masks.append([0] * len(prompt) + [1] * len(reply))
    reference = np.stack([rng.normal(-300, 30, pairs), rng.normal(-300, 30, pairs),
                          [sum(m) for m in cm], [sum(m) for m in rm]], 1)
    return Examples(ci, cm, ri, rm, reference)


def order_batches(examples, batch: int, grouped: bool):
    from dpocache.stages.train.batching import epoch_order, micro_batches

    order = epoch_order(examples.lengths, batch, seed=42, epoch=0, group_by_length=grouped)
    return [list(map(int, idx)) for idx in micro_batches(order, batch)]


def child(args) -> None:
    """One (order, mode) measurement in this process; prints its JSON."""
    from transformers import AutoModelForCausalLM

    from dpocache.logprobs import TokenLogps
    from dpocache.losses import LossConfig, LossInputs, build_loss
    from dpocache.stages.train.examples import forward_batch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).train()
    logp_model = TokenLogps(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    examples = make_examples(args.pairs)
    batches = order_batches(examples, args.batch, args.order == "grouped")
    packing = args.mode == "packed"
    loss = build_loss(LossConfig(loss_type="dpo", beta=0.1))

    def step(idx):
        policy, reference, ntok, _ = forward_batch(logp_model, examples, idx, 0, "cpu", packing=packing)
        loss(LossInputs(policy, reference)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ntok

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(batches[0][:1])  # warm-up on one pair
    t0 = time.perf_counter()
    tokens = sum(step(idx) for idx in batches)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lengths = examples.lengths  # widest side of each pair: the padded width it needs
    padded_tokens = sum(2 * len(idx) * int(lengths[idx].max()) for idx in batches)
    sides = [[len(examples.chosen_ids[i]) for i in idx] + [len(examples.rejected_ids[i]) for i in idx]
             for idx in batches]
    print(json.dumps({"tok_s": round(tokens / elapsed), "seconds": round(elapsed, 1),
                      "peak_mib_over_baseline": round((peak - baseline) / 1024, 1), "real_tokens": tokens,
                      "padded_tokens": padded_tokens if not packing else tokens,
                      # query-key pairs the attention computes: padded rows, one dense packed row, and what a
                      # varlen kernel (flash attention with cu_seqlens) would compute for the packed row
                      "attention_pairs": sum(sum(ls) ** 2 for ls in sides) if packing else
                      sum(len(ls) * max(ls) ** 2 for ls in sides),
                      "varlen_attention_pairs": sum(sum(n * n for n in ls) for ls in sides)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--order", choices=["random", "grouped"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from conftest import GGUF_NAME, make_tiny_llama, smollm_gguf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp())
    AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(tmp / "tok")
    model_dir = make_tiny_llama(tmp / "m", tmp / "tok", hidden=128, layers=4, heads=2)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    out = {"bench": "packing", "params": params, "pairs": args.pairs, "batch_pairs": args.batch}
    for order in ("random", "grouped"):
        for mode in ("padded", "packed"):
            cmd = [sys.executable, __file__, "--child", "--model_dir", str(model_dir), "--order", order,
                   "--mode", mode, "--pairs", str(args.pairs), "--batch", str(args.batch)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            out[f"{order}_{mode}"] = json.loads(res.stdout.strip().splitlines()[-1])
        pad, pk = out[f"{order}_padded"], out[f"{order}_packed"]
        out[f"{order}_pad_fraction"] = round(1 - pad["real_tokens"] / pad["padded_tokens"], 3)
        out[f"{order}_speedup"] = round(pk["tok_s"] / pad["tok_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

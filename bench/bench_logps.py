"""Peak memory and time of one training forward+backward: chunked log-probs (``--fused_logps``, the output
head applied only at trainable positions, in chunks) vs the full-logits path. ``fused`` keeps chunk logits
for backward up to ``--logps_keep_mb`` (default 1024), ``fused_lowmem`` recomputes every chunk (keep 0).

Each variant runs in its own process. The peak is the growth of the resident set over the step (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``), so the model and the batch, identical
in both, are not counted. Prints one JSON line per variant and a summary line.

    python bench/bench_logps.py [--batch 8] [--length 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def build_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batch(n: int, length: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    mask = attn.clone()
    mask[:, : length // 3] = 0  # the prompt third is not trainable
    return ids, attn, mask


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def run_variant(args) -> dict:
    from dpocache.logprobs import TokenLogps

    torch.set_num_threads(args.threads)
    model = build_model(args.vocab, args.hidden, args.layers)
    model.train()
    keep = 0.0 if args.variant == "fused_lowmem" else args.keep_mb
    logp = TokenLogps(model, selected=args.variant != "full", chunk=args.chunk, keep_mb=keep)
    ids, attn, mask = batch(2 * args.batch, args.length, args.vocab)
    times, peaks = [], []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status("VmRSS")
        t0 = time.perf_counter()
        loss = -(logp(ids, attn, mask).sum(-1) / mask.sum(-1)).mean()
        loss.backward()
        elapsed = time.perf_counter() - t0
        peak = _status("VmHWM") - base
        if i:  # the first step warms up the allocator
            times.append(elapsed)
            peaks.append(peak)
    tokens = int(attn.sum())
    return {"bench": "logps", "variant": args.variant, "batch_pairs": args.batch, "length": args.length,
            "vocab": args.vocab, "params": sum(p.numel() for p in model.parameters()),
            "step_seconds": statistics.median(times), "tokens_per_second": tokens / statistics.median(times),
            "peak_step_mib": statistics.median(peaks) / 2**20, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["full", "fused", "fused_lowmem"])
    parser.add_argument("--batch", type=int, default=8, help="preference pairs (2x sequences)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per output-head chunk (fused)")
    parser.add_argument("--keep_mb", type=float, default=1024.0, help="logits kept for backward (fused)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("full", "fused", "fused_lowmem"):
        keys = ("batch", "length", "vocab", "hidden", "layers", "repeats", "threads", "chunk", "keep_mb")
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={getattr(args, k)}" for k in keys]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        print(out, flush=True)
    full = results["full"]
    summary = {"bench": "logps", "summary": True}
    for name in ("fused", "fused_lowmem"):
        r = results[name]
        summary.update({f"peak_ratio_{name}_over_full": r["peak_step_mib"] / full["peak_step_mib"],
                        f"speed_ratio_{name}_over_full": r["tokens_per_second"] / full["tokens_per_second"],
                        f"loss_abs_diff_{name}": abs(r["loss"] - full["loss"])})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

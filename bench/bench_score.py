#!/usr/bin/env python3
"""Stage-one throughput: HF backend (selected positions), vLLM backend, and a bare no_grad forward over
the same sequences, on a ~7M-parameter Llama (head_dim 64) built here; plus the vLLM bf16 gap; plus the
whole stage-one loop (``dpocache.stages.score.score``: host batches, the forward, the commit thread's
Arrow shard, bulk validation, Parquet write and fsync into a real store) over the same batches.
Prints one JSON line.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 python bench/bench_score.py [--skip_vllm]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_vllm", action="store_true", help="measure the HF paths only")
    args = parser.parse_args()
    from conftest import GGUF_NAME, smollm_gguf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpocache.logprobs import TokenLogps, full_token_logps, pad_batch
    from dpocache.stages.vllm_backend import VLLMOptions, VLLMScorer

    tmp = Path(tempfile.mkdtemp())
    tok = AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME)
    tok.save_pretrained(tmp / "tok")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny_llama

    model_dir = make_tiny_llama(tmp / "m", tmp / "tok", hidden=128, layers=4, heads=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 49000, int(rng.integers(args.length // 2, args.length))).tolist()
            for _ in range(args.sequences)]
    masks = [[0] * (len(s) // 3) + [1] * (len(s) - len(s) // 3) for s in seqs]
    tokens = sum(map(len, seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))

    def run(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return tokens / float(np.median(times))

    def bare():
        with torch.no_grad():
            for k in range(0, len(order), args.batch):
                idx = order[k:k + args.batch]
                ids, attn, _ = pad_batch([seqs[i] for i in idx], [masks[i] for i in idx], 0)
                model(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)

    selected = TokenLogps(model)

    def hf():
        with torch.no_grad():
            for k in range(0, len(order), args.batch):
                idx = order[k:k + args.batch]
                selected(*pad_batch([seqs[i] for i in idx], [masks[i] for i in idx], 0))

    out = {"bench": "score", "params": params, "sequences": len(seqs), "tokens": tokens}
    # round-robin (one repeat of each in turn), so that other load on the machine hits every variant alike
    now, before = host_paths(tmp, seqs, masks, args.batch)
    variants = {"bare_forward": bare, "hf_backend": hf,
                "stage_one": stage_one_loop(tmp, model_dir, tok, seqs, masks, args.batch),
                "host_only": now, "host_only_per_row": before}
    wall: dict = {k: [] for k in variants}
    cpu: dict = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    for name in variants:
        out[f"{name}_tok_s"] = round(tokens / float(np.median(wall[name])))
        out[f"{name}_tok_cpu_s"] = round(tokens / float(np.median(cpu[name])))
    out["host_only_s"] = round(float(np.median(wall["host_only"])), 4)
    out["host_only_per_row_s"] = round(float(np.median(wall["host_only_per_row"])), 4)
    for unit in ("tok_s", "tok_cpu_s"):
        out[f"stage_one_over_hf_backend_{unit}"] = round(out[f"stage_one_{unit}"] / out[f"hf_backend_{unit}"], 2)
        out[f"stage_one_over_bare_{unit}"] = round(out[f"stage_one_{unit}"] / out[f"bare_forward_{unit}"], 2)
    if args.skip_vllm:
        print(json.dumps(out))
        return
    scorer = VLLMScorer(str(model_dir), VLLMOptions(vllm_dtype="float32"), progress=False)
    out["vllm_backend_tok_s"] = round(run(lambda: scorer.token_logps(seqs)))
    scorer.close()
    torch.set_num_threads(2)
    bf = VLLMScorer(str(model_dir), VLLMOptions(vllm_dtype="bfloat16"), progress=False)
    vals = bf.token_logps(seqs[:32])
    bf.close()
    gaps = []
    for seq, v in zip(seqs[:32], vals):
        ids, attn, m = pad_batch([seq], [[0] + [1] * (len(seq) - 1)], 0)
        with torch.no_grad():
            ref = full_token_logps(model, ids, attn, m)[0].double().numpy()
        gaps.append(np.abs(ref[1:] - v[1:]))
    gaps = np.concatenate(gaps)
    out.update(vllm_bf16_gap_max=round(float(gaps.max()), 4), vllm_bf16_gap_mean=round(float(gaps.mean()), 4))
    out["hf_over_bare"] = round(out["hf_backend_tok_s"] / out["bare_forward_tok_s"], 2)
    out["vllm_over_bare"] = round(out["vllm_backend_tok_s"] / out["bare_forward_tok_s"], 2)
    print(json.dumps(out))


def bench_dataset(seqs, masks):
    import hashlib

    import datasets

    pairs = len(seqs) // 2
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(pairs)]
    ids, mask = datasets.List(datasets.Value("int32")), datasets.List(datasets.Value("int8"))
    features = datasets.Features({"hash": datasets.Value("string"), "chosen_input_ids": ids, "chosen_mask": mask,
                                  "rejected_input_ids": ids, "rejected_mask": mask})
    return hashes, datasets.Dataset.from_dict(
        {"hash": hashes, "chosen_input_ids": seqs[0::2], "chosen_mask": masks[0::2],
         "rejected_input_ids": seqs[1::2], "rejected_mask": masks[1::2]}, features=features)


def host_paths(tmp: Path, seqs, masks, batch: int):
    """Stage one's host-side work alone (no model; every token's log-prob set to -0.1): the current path
    (Arrow columns -> flat arrays -> padded batches -> Arrow shard, validated in bulk) and the per-row path
    it replaced (``select().to_dict()`` Python lists, per-row padding, per-row dicts and checks)."""
    from dpocache.artifacts import ReferenceStore
    from dpocache.logprobs import pad_batch
    from dpocache.stages.scoring.batches import ChunkData, batch_order, build_batch, scores_from_token_values
    from dpocache.stages.scoring.commit import shard_table

    hashes, dataset = bench_dataset(seqs, masks)
    rows = list(range(len(hashes)))
    arrow = dataset.with_format("arrow")
    calls = iter(range(10**6))

    def now():
        store = ReferenceStore.create_or_open(tmp / f"host{next(calls)}", {"bench": "host"})
        chunk = ChunkData(arrow[rows])
        for seqs_ in batch_order(chunk, batch):
            build_batch(chunk, seqs_, 0, pin=False)
        store.add_table(shard_table(chunk, scores_from_token_values(chunk, np.full(chunk.tokens, -0.1), False),
                                    False))
        store.close()

    def before():
        store = ReferenceStore.create_or_open(tmp / f"host{next(calls)}", {"bench": "host"})
        data = dataset.select(rows).to_dict()
        sequences = data["chosen_input_ids"] + data["rejected_input_ids"]
        seq_masks = data["chosen_mask"] + data["rejected_mask"]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        values = [None] * len(sequences)
        for k in range(0, len(order), batch):
            idx = order[k:k + batch]
            ids, _, _ = pad_batch([sequences[i] for i in idx], [seq_masks[i] for i in idx], 0)
            logps = torch.full(ids.shape, -0.1, dtype=torch.float32).double().numpy()
            for row, i in enumerate(idx):
                values[i] = logps[row, :len(sequences[i])]
        n = len(data["hash"])
        with store.writer(rows_per_shard=10**6) as writer:
            for j in range(n):
                row = {"hash": data["hash"][j]}
                for side, k in (("chosen", j), ("rejected", n + j)):
                    m = np.asarray(data[f"{side}_mask"][j], dtype=bool)
                    v = np.where(m, values[k], 0.0)
                    row.update({f"{side}_input_ids": data[f"{side}_input_ids"][j],
                                f"{side}_mask": data[f"{side}_mask"][j],
                                f"ref_{side}_logps": float(v.sum()), f"ref_{side}_tokens": int(m.sum())})
                writer.add(row)
        store.close()

    return now, before


def stage_one_loop(tmp: Path, model_dir: Path, tok, seqs, masks, batch: int):
    """The whole stage-one loop over ``seqs`` (pairs of consecutive sequences), into a fresh store per call."""
    from dpocache.artifacts import ReferenceStore
    from dpocache.devices import resolve_device
    from dpocache.modeling import ModelConfig
    from dpocache.stages.score import ScoreConfig, ScorePlan, score
    from dpocache.stages.scoring.hf import HFScorer
    from dpocache.stages.scoring.plan import plan_chunks

    hashes, dataset = bench_dataset(seqs, masks)
    pairs = len(hashes)
    cfg = ScoreConfig(batch_size=batch)
    scorer = HFScorer(ModelConfig(model_name_or_path=str(model_dir)), tok, batch, resolve_device("cpu"))
    calls = iter(range(10**6))

    def loop():
        store = ReferenceStore.create_or_open(tmp / f"store{next(calls)}", {"bench": "score"})
        plan = ScorePlan(tok, dataset, "bench", store, plan_chunks(hashes, set(), cfg.rows_per_shard, []), {},
                         hashes, hashes, pending=pairs)
        score(plan, scorer, cfg, progress=False)
        store.close()

    return loop


if __name__ == "__main__":
    main()

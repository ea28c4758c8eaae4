#!/usr/bin/env python3
"""Both stages on one CUDA machine, against a bare PyTorch loop and TRL: one unattended run, no network.

    python bench/gpu/run.py                 # the GPU run (a few minutes; see bench/gpu/README.md)
    python bench/gpu/run.py --smoke         # the same steps on CPU with tiny models (what `make test` runs)

What is measured, per model shape (a random-init 0.79B Llama with an 8,192-token vocabulary, and a Llama
with a 128,256-token vocabulary and fewer layers, both built here from a config; a word-level tokenizer
with a ChatML template is built here too) on synthetic preference pairs of mixed lengths:

- stage one: ``dpocache score --dtype bfloat16`` against a bare bf16 ``no_grad`` forward + fp32
  log-softmax over the same batches (stage one's: examples sorted by hash in chunks of
  ``--rows_per_shard``, each chunk's sequences sorted by length). Its rate is timed from the moments its
  shards appear in the store (one shard per chunk; the first chunk is warm-up);
- stage two: ``dpocache train --bf16`` (defaults, ``--use_liger_kernel true``, ``--packing``,
  ``--torch_compile``) against a bare HF loop (bf16 autocast forward + backward + fused AdamW) and TRL
  ``DPOTrainer(precompute_ref_log_probs=True)``, all on the same token ids in the same batches (stage
  two's own length-grouped order, read from the store). Steady tokens/s from ``metrics.jsonl``
  (``perf/tokens_per_second`` per window and ``perf/elapsed_seconds``; without them, the moments its lines
  appear and the plan's tokens per step), the first ``--warmup`` steps discarded;
- every variant: non-pad tokens per second, MFU (6 x parameters x tokens/s over the GPU's peak bf16
  FLOP/s for training, 2 x for forward-only; ``--peak_tflops`` overrides the table), peak GPU memory
  (``torch.cuda.max_memory_allocated``), peak RSS.

How: every step (model build, the reference store stage two trains from, each variant) runs in its own
child process under a time limit; variants run round-robin, ``--repeats`` times (first runs on a fresh
machine are slower), and a row goes to the JSONL as each step ends. A failed step (a flag this version
does not have, a crash, a time-out) is a row with its error, never the end of the run. The run ends with
a table per shape and the ratios the targets use, next to the targets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import (REPO, Stamps, child_env, log_tail, machine, plan_step_tokens, read_jsonl,  # noqa: E402
                      steady, store_plan, synthetic_rows, train_rate, watch_child, write_jsonl)
from gpu_report import status_line, render, summary  # noqa: E402

SHAPES = {"llama-0.8b": dict(hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=5632, vocab=8192),
          "llama-128k": dict(hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=128256)}
SMOKE_SHAPES = {"tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512),
                "tiny-wide": dict(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, vocab=4096)}
SIZES = dict(pairs=256, max_length=1024, batch=8, warmup=3, timed=10, score_batch=32, rows_per_shard=64,
             profile="long", repeats=2, budget_s=270.0, step_timeout=150.0)
SMOKE = dict(pairs=24, max_length=192, batch=4, warmup=1, timed=2, score_batch=8, rows_per_shard=8,
             profile="mixed", repeats=1, budget_s=0.0, step_timeout=240.0)
# name: (kind, extra dpocache flags or bench child, needs CUDA)
VARIANTS = {"score": ("score", [], False),
            "forward": ("child", "forward", False),
            "dpocache": ("train", [], False),
            "trl": ("child", "trl_precompute", False),
            "bare": ("child", "bare", False),
            "packing": ("train", ["--packing"], False),
            "liger": ("train", ["--use_liger_kernel", "true"], True),
            "compile": ("train", ["--torch_compile"], True)}
SECOND_SHAPE_VARIANTS = ("dpocache", "trl", "bare")  # what the targets need on the wide-vocabulary shape
LAST_ROUND_ONLY = ("compile",)  # the slowest to start: once, at the end, on a warm machine


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, few steps")
    parser.add_argument("--out", type=Path, help="results folder (default bench/gpu/out, smoke: a temporary one)")
    parser.add_argument("--shapes", nargs="+", help="model shapes (default: both)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="variants (default: all)")
    parser.add_argument("--peak_tflops", type=float, help="peak dense bf16 TFLOP/s of the GPU (default: table)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, stores, logs)")
    for key, value in SIZES.items():
        parser.add_argument(f"--{key}", type=type(value), help=f"default {value} (smoke: {SMOKE[key]})")
    parser.add_argument("--child", choices=["build"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape_specs = SMOKE_SHAPES if args.smoke else SHAPES
    args.shapes = args.shapes or list(args.shape_specs)
    unknown = set(args.shapes) - set(args.shape_specs)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; known: {sorted(args.shape_specs)}")
    args.variants = args.variants or list(VARIANTS)
    args.device = "cpu" if args.smoke else "cuda"
    if args.warmup < 1 or args.timed < 1 or args.repeats < 1:
        parser.error("--warmup, --timed and --repeats must be >= 1")
    return args


def build_child(spec: dict) -> dict:
    """Child step: the tokenizer, a micro reference Llama and one random-init model per shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchlib import save_llama, save_word_tokenizer

    work = Path(spec["work"])
    tok = save_word_tokenizer(work / "tokenizer")
    device = spec["device"] if spec["device"] == "cpu" or torch.cuda.is_available() else "cpu"
    save_llama(work / "micro", tok, hidden=16, layers=2, heads=2, kv_heads=2, intermediate=32, vocab=0,
               max_positions=spec["max_positions"])
    params = {}
    for name, shape in spec["shapes"].items():
        save_llama(work / name, tok, dtype="bfloat16", device=device, max_positions=spec["max_positions"], **shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / name))
        params[name] = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    return {"params": params, "device_name": name, "build_device": device}


def _shards(store: Path) -> list[str]:
    manifest = store / "manifest.json"
    return [s["path"] for s in json.loads(manifest.read_text())["shards"]] if manifest.is_file() else []


def shard_tokens(store: Path) -> list[int]:
    """Non-pad tokens (chosen + rejected) of each shard, in publication order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = []
    for rel in _shards(store):
        table = pq.read_table(store / rel, columns=["chosen_input_ids", "rejected_input_ids"])
        out.append(sum(pc.sum(pc.list_value_length(table[c])).as_py() or 0 for c in table.column_names))
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.work = self.out / "work"
        self.results = self.out / "results.jsonl"
        self.env = child_env(self.work / "home")
        self.t0 = time.perf_counter()
        self.info: dict = {}
        self.plans: dict = {}
        self.failed: set[str] = set()

    def record(self, row: dict) -> dict:
        row = {"bench": "gpu", **row}
        with open(self.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        shown = f"{row['tok_s']:,.0f} tok/s" if row.get("tok_s") else status_line(row)
        print(f"[{time.perf_counter() - self.t0:4.0f} s] {row.get('shape', '-')} {row['variant']} "
              f"#{row.get('repeat', 0)}: {shown}", file=sys.stderr, flush=True)
        return row

    def run(self, name: str, cmd: list[str], *, timeout: float | None = None, poll=None) -> dict:
        """Run one child step; ``status`` ok / failed / timeout and the log's tail when it did not end well.
        (``peak_rss_mb`` here is wait4's, floored at this process's own peak; variants replace it with the
        child's own ``VmHWM``.)"""
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        res = watch_child(cmd, env=self.env, log=log, timeout=timeout or self.args.step_timeout, on_poll=poll)
        status = "timeout" if res["timed_out"] else ("ok" if res["returncode"] == 0 else "failed")
        out = {"status": status, "seconds": round(res["seconds"], 1), "peak_rss_mb": round(res["peak_rss"] / 2**20),
               "log": str(log)}
        if status != "ok":
            out["error"] = f"exit {res['returncode']}: " + log_tail(log)
        return out

    def setup(self) -> None:
        """Models, data, the stage-two store (``dpocache score`` with the micro reference) and the plans."""
        a = self.args
        spec = {"work": str(self.work), "device": a.device, "max_positions": a.max_length + 64,
                "shapes": {s: a.shape_specs[s] for s in a.shapes}}
        res = self.run("build", [sys.executable, __file__, "--child", "build", "--spec", json.dumps(spec)])
        if res["status"] == "ok":
            self.info = json.loads(Path(res["log"]).read_text().strip().splitlines()[-1])
        self.record({"variant": "build", **res, **self.info})
        if res["status"] != "ok":
            self.failed.add("build")
            return
        self.data = write_jsonl(self.work / "pairs.jsonl", synthetic_rows(a.pairs, seed=0, profile=a.profile))
        self.store = self.work / "store"
        res = self.run("prepare", self.score_cmd(self.work / "micro", self.store, []))
        self.record({"variant": "prepare", **res, **self.probe(Path(str(self.store) + "-probe"))})
        if res["status"] != "ok":
            self.failed.add("prepare")
            return
        try:
            self.make_plans()
        except Exception as exc:  # e.g. a store this version of the bench cannot read
            self.failed.add("plans")
            self.record({"variant": "plans", "status": "failed", "error": f"{type(exc).__name__}: {exc}"})

    def make_plans(self) -> None:
        """Per shape: stage two's first batches (``train``) and stage one's batches (``forward``)."""
        a = self.args
        for shape in a.shapes:
            common = dict(device=a.device, bf16=True, max_length=a.max_length, lr=1e-6)
            train = store_plan(self.store, self.work / shape, batch=a.batch, steps=a.warmup + a.timed, compact=True,
                               **common)
            full = store_plan(self.store, self.work / shape, batch=a.batch, steps=1, **common)
            full.update(scorer_batches(full["hashes"], full, a.rows_per_shard, a.score_batch))
            self.plans[shape] = {"train": train, "forward": full}
            for kind, plan in self.plans[shape].items():
                (self.work / f"plan-{shape}-{kind}.json").write_text(json.dumps(plan))

    def score_cmd(self, model: Path, store: Path, extra: list[str]) -> list[str]:
        a = self.args
        return [sys.executable, str(REPO / "bench" / "cli_probe.py"), "--probe_out", str(store) + "-probe", "--",
                "score", "--model_name_or_path", str(model), "--dataset", str(self.data), "--chat_template_name",
                "chatml", "--max_seq_length", str(a.max_length), "--store", str(store), "--batch_size",
                str(a.score_batch), "--rows_per_shard", str(a.rows_per_shard), "--dataset_cache_dir",
                str(self.work / "cache"), *extra]

    def variant(self, shape: str, name: str, repeat: int) -> dict:
        a = self.args
        kind, extra, needs_cuda = VARIANTS[name]
        row = dict(shape=shape, variant=name, repeat=repeat)
        if needs_cuda and a.device == "cpu":
            return self.record(dict(row, status="skipped", reason="needs CUDA"))
        if self.failed:
            return self.record(dict(row, status="skipped", reason=f"{', '.join(sorted(self.failed))} failed"))
        if a.budget_s and time.perf_counter() - self.t0 > a.budget_s:
            return self.record(dict(row, status="skipped", reason=f"time budget of {a.budget_s:.0f} s spent"))
        tag = f"{shape}-{name}-{repeat}"
        try:
            if kind == "score":
                res = self.stage_one(shape, tag)
            elif kind == "train":
                res = self.stage_two(shape, tag, extra)
            else:
                res = self.bench_child(shape, tag, extra)
        except Exception as exc:  # reading a step's output went wrong: a row, and the run goes on
            res = {"status": "failed", "error": f"measuring the step: {type(exc).__name__}: {exc}"}
        if res.get("tok_s") is not None:
            factor = 2 if kind == "score" or extra == "forward" else 6
            peak = a.peak_tflops or peak_tflops(self.info.get("device_name", ""))
            res["tok_s"] = round(res["tok_s"], 1)
            res["mfu"] = round(factor * self.info["params"][shape] * res["tok_s"] / (peak * 1e12), 4) if peak else None
        if res["status"] == "ok" and res.get("tok_s") is None:
            res.update(status="failed", error="no steady rate: too few steps or stamps recorded")
        return self.record(dict(row, **res))

    def stage_one(self, shape: str, tag: str) -> dict:
        store = self.work / f"store-{tag}"
        stamps = Stamps(lambda: len(_shards(store)))
        cmd = self.score_cmd(self.work / shape, store, ["--dtype", "bfloat16", "--device", self.args.device])
        res = self.run(tag, cmd, poll=stamps)
        res.update(self.probe(Path(str(store) + "-probe")))
        if res["status"] == "ok":
            res["tok_s"] = steady(shard_tokens(store), stamps.times, 1)
        shutil.rmtree(store, ignore_errors=True)
        return res

    def stage_two(self, shape: str, tag: str, extra: list[str]) -> dict:
        a, plan = self.args, self.plans[shape]["train"]
        out = self.work / f"out-{tag}"
        metrics = out / "metrics.jsonl"
        stamps = Stamps(lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0)
        cmd = [sys.executable, str(REPO / "bench" / "cli_probe.py"), "--probe_out", str(out) + "-probe", "--",
               "train", "--model_name_or_path", str(self.work / shape), "--store", str(self.store), "--output_dir",
               str(out), "--bf16", "--loss_type", "dpo", "--beta", "0.1", "--learning_rate", str(plan["lr"]),
               "--warmup_ratio", "0", "--per_device_train_batch_size", str(a.batch), "--max_train_steps",
               str(len(plan["steps"])), "--logging_steps", "1", "--checkpointing_steps", "none", *extra]
        res = self.run(tag, cmd, poll=stamps)
        res.update(self.probe(Path(str(out) + "-probe")))
        lines = read_jsonl(metrics)
        if res["status"] == "ok":
            expected = plan_step_tokens(plan)
            res["tok_s"], res["rate_from"], reported = train_rate(lines, stamps.times, expected, a.warmup)
            if reported is not None:
                res["same_batches"] = abs(reported - sum(expected[:len(lines)])) <= 0.01 * sum(expected)
        shutil.rmtree(out, ignore_errors=True)
        return res

    def bench_child(self, shape: str, tag: str, child: str) -> dict:
        kind = "forward" if child == "forward" else "train"
        plan = self.plans[shape][kind]
        cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--child", child, "--plan",
               str(self.work / f"plan-{shape}-{kind}.json")]
        res = self.run(tag, cmd)
        if res["status"] == "ok":
            found = [x for x in map(_json_or_none, Path(res["log"]).read_text().splitlines()) if x and "step_ends" in x]
            if found:
                out = found[-1]
                warmup = plan["warmup_batches"] if kind == "forward" else self.args.warmup
                res["tok_s"] = steady(out["step_tokens"], out["step_ends"], warmup)
                res.update(peak_gpu_bytes=out.get("peak_gpu_bytes"), peak_rss_mb=round(out["peak_rss"] / 2**20))
                if kind == "train":
                    res["same_batches"] = out["step_tokens"] == plan_step_tokens(plan)
        return res

    def probe(self, prefix: Path) -> dict:
        path = Path(f"{prefix}.rank0.json")
        if not path.is_file():
            return {}
        got = json.loads(path.read_text())
        path.unlink()
        return {"peak_gpu_bytes": got["peak_gpu_bytes"], "device_name": got["device_name"],
                "peak_rss_mb": round(got["peak_rss"] / 2**20)}


def _json_or_none(line: str):
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def scorer_batches(hashes: list[str], plan: dict, rows_per_shard: int, batch: int) -> dict:
    """Stage one's batches as ``[side, index]`` lists: examples sorted by hash, cut into chunks of
    ``rows_per_shard`` (one shard each); within a chunk, chosen then rejected, sorted by length (stable),
    ``batch`` sequences per forward. ``warmup_batches``: those of the first chunk."""
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    batches, first = [], None
    for start in range(0, len(order), rows_per_shard):
        chunk = order[start:start + rows_per_shard]
        seqs = [(0, i) for i in chunk] + [(1, i) for i in chunk]
        seqs.sort(key=lambda s: len(plan["chosen_ids" if s[0] == 0 else "rejected_ids"][s[1]]))
        batches += [seqs[k:k + batch] for k in range(0, len(seqs), batch)]
        first = len(batches) if first is None else first
    return {"forward_batches": batches, "warmup_batches": first}


# Dense bf16 tensor-core peak (TFLOP/s) by device-name fragment; the first match wins.
PEAK_TFLOPS = (("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("V100", 125.0))


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS if k in device_name), None)


def describe() -> dict:
    """The machine and library versions (and the commit) the figures belong to."""
    import importlib.metadata as md
    import subprocess

    out = {k: v for k, v in machine().items() if k != "bench"}
    for pkg in ("liger-kernel", "triton", "flash-attn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    out["commit"] = git.stdout.strip() or None
    return out


def schedule(args) -> list[tuple[str, str, int]]:
    """Round-robin: each round runs every variant of every shape once; the second shape runs only
    ``SECOND_SHAPE_VARIANTS``; ``LAST_ROUND_ONLY`` variants run once, after all rounds."""
    steps = [(shape, name, r) for r in range(args.repeats) for shape in args.shapes for name in args.variants
             if (shape == args.shapes[0] or name in SECOND_SHAPE_VARIANTS) and name not in LAST_ROUND_ONLY]
    return steps + [(shape, name, args.repeats - 1) for shape in args.shapes for name in args.variants
                    if name in LAST_ROUND_ONLY and (shape == args.shapes[0] or name in SECOND_SHAPE_VARIANTS)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child == "build":
        print(json.dumps(build_child(json.loads(args.spec))))
        return 0
    import tempfile

    args.out = args.out or (Path(tempfile.mkdtemp(prefix="gpubench-")) if args.smoke else REPO / "bench/gpu/out")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    bench.work.mkdir(parents=True, exist_ok=True)
    bench.record(dict(variant="machine", status="ok", smoke=args.smoke, sizes={k: getattr(args, k) for k in SIZES},
                      shapes={s: args.shape_specs[s] for s in args.shapes}, **describe()))
    bench.setup()
    for shape, name, repeat in schedule(args):
        bench.variant(shape, name, repeat)
    rows = [json.loads(x) for x in bench.results.read_text().splitlines()]
    bench.record(dict(variant="summary", status="ok", **summary(rows, args.shapes)))
    print(render([json.loads(x) for x in bench.results.read_text().splitlines()]))
    print(f"\nrows: {bench.results}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

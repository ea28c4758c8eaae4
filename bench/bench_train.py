#!/usr/bin/env python3
"""Stage-two training throughput and peak RSS: dpocache against TRL and plain loops, side by side.

Same model, same synthetic mixed-length pairs, same batches (dpocache's length-grouped order), same
batch size and max length, fp32 on CPU. Variants (each in its own child process, so peak RSS is per
variant): dpocache stage two on a store scored by ``dpocache score``; TRL ``DPOTrainer`` with
precomputed reference log-probs and with a live reference model; a bare forward+backward+AdamW loop;
a plain ``no_grad`` forward loop. Throughput = non-pad tokens of chosen + rejected per second over
windows of optimizer steps after the warm-up; the median window is reported. With ``--runs N`` every
variant runs N times (round-robin, so load drifts hit all variants alike): tokens/s is the median over
the windows of all runs, peak RSS the median over the runs (each run's peak is listed too). Prints one
JSON line.

    python bench/bench_train.py                   # the ~8M Llama, 8 pairs per step, up to 256 tokens
    python bench/bench_train.py --model smollm2   # SmolLM2-135M-Instruct, 4 pairs per step, up to 192 tokens
    python bench/bench_train.py --quick           # a fast smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchlib import (REPO, bench_model, child_env, count_params, median, plan_step_tokens, run_child, score_command,
                      store_plan, synthetic_rows, write_jsonl)
from train_variants import VARIANTS, run_variant

SIZES = {"tiny": {"batch": 8, "max_length": 256, "pairs": 128, "warmup": 2, "window": 4, "repeats": 3, "runs": 1},
         "smollm2": {"batch": 4, "max_length": 192, "pairs": 32, "warmup": 1, "window": 2, "repeats": 3, "runs": 3}}
QUICK = {"pairs": 32, "warmup": 1, "window": 2, "repeats": 2, "max_length": 128, "runs": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, help="pairs per optimizer step")
    parser.add_argument("--max_length", type=int, help="maximum tokens per sequence")
    parser.add_argument("--pairs", type=int, help="synthetic preference pairs")
    parser.add_argument("--warmup", type=int, help="optimizer steps excluded from timing (>= 1)")
    parser.add_argument("--window", type=int, help="optimizer steps per timed window")
    parser.add_argument("--repeats", type=int, help="timed windows (the median is reported)")
    parser.add_argument("--runs", type=int, help="child processes per variant (peak RSS: the median run)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="few pairs, short sequences, few steps")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per child process")
    parser.add_argument("--mmap_threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for every variant "
                        "(default: glibc's dynamic threshold); peak RSS depends on it, see BENCHMARKS.md")
    parser.add_argument("--dpocache_set", nargs="+", default=[], metavar="OPTION=VALUE",
                        help="stage-two options for the dpocache variant (e.g. release_host_memory=false)")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = dict(SIZES[args.model], **(QUICK if args.quick else {}))
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.warmup, args.window, args.repeats, args.runs) < 1:
        parser.error("--warmup, --window, --repeats and --runs must be >= 1")
    if any("=" not in item for item in args.dpocache_set):
        parser.error("--dpocache_set takes OPTION=VALUE items")
    return args


def score_store(args, work: Path, model_dir: Path, home: Path) -> dict:
    """Stage one with the real command line: ``dpocache score`` in a child process."""
    data = write_jsonl(work / "pairs.jsonl", synthetic_rows(args.pairs, seed=0))
    store = work / "store"
    cmd = score_command(model_dir, data, store, cache=work / "cache", batch=2 * args.batch, max_length=args.max_length)
    run = run_child(cmd, env=child_env(home), log=work / "score.log", timeout=args.timeout)
    return {"store": str(store), "seconds": run["seconds"], "peak_rss": run["peak_rss"], "command": cmd}


def make_plan(args, work: Path, model_dir: Path, store: str) -> Path:
    """The examples as stage two loads them and the batches it will draw (dpocache's own order)."""
    from dpocache.stages.train.config import TrainConfig

    plan = store_plan(store, model_dir, batch=args.batch, steps=args.warmup + args.window * args.repeats,
                      seed=TrainConfig().seed, max_length=args.max_length, lr=args.lr,
                      dpocache_set=dict(item.split("=", 1) for item in args.dpocache_set))
    path = work / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def window_rates(result: dict, warmup: int, window: int, repeats: int, clock: str = "step_ends") -> list[float]:
    """Tokens per second (wall, or process CPU with ``clock="step_cpu"``) of each timed window of
    ``window`` steps after ``warmup`` steps."""
    ends, tokens = result[clock], result["step_tokens"]
    rates = []
    for r in range(repeats):
        a = warmup + r * window
        b = a + window
        rates.append(sum(tokens[a:b]) / (ends[b - 1] - ends[a - 1]))
    return rates


def padding_fraction(plan: dict) -> float:
    """Pad tokens / all tokens of the planned concatenated batches."""
    real = total = 0
    for idx in plan["steps"]:
        lens = [len(plan["chosen_ids"][i]) for i in idx] + [len(plan["rejected_ids"][i]) for i in idx]
        real += sum(lens)
        total += max(lens) * len(lens)
    return 1 - real / total


def summarize(args, results: dict[str, list[dict]], plan: dict, stage_one: dict, params: int) -> dict:
    """One JSON line from every run of every variant (``results[name]``: one dict per child process)."""
    out = {"bench": "train", "model": args.model, "params": params, "batch": args.batch,
           "mmap_threshold": args.mmap_threshold, "dpocache_set": args.dpocache_set,
           "max_length": args.max_length, "pairs": len(plan["chosen_ids"]), "warmup_steps": args.warmup,
           "window_steps": args.window, "repeats": args.repeats, "runs": args.runs, "quick": args.quick,
           "padded_fraction": round(padding_fraction(plan), 3),
           "stage_one_seconds": round(stage_one["seconds"], 1),
           "stage_one_peak_rss_mb": round(stage_one["peak_rss"] / 2**20)}
    expected = plan_step_tokens(plan)
    peaks = {}
    for name, runs in results.items():
        rates = [x for res in runs for x in window_rates(res, args.warmup, args.window, args.repeats)]
        cpu = [x for res in runs for x in window_rates(res, args.warmup, args.window, args.repeats, "step_cpu")]
        peaks[name] = median([res["peak_rss"] for res in runs])
        out[f"{name}_tok_s"] = round(median(rates), 1)
        out[f"{name}_tok_s_windows"] = [round(r, 1) for r in rates]
        out[f"{name}_tok_per_cpu_s"] = round(median(cpu), 1)
        out[f"{name}_peak_rss_mb"] = round(peaks[name] / 2**20)
        out[f"{name}_peak_rss_mb_runs"] = [round(res["peak_rss"] / 2**20) for res in runs]
        out[f"{name}_init_seconds"] = round(median([res["init_seconds"] for res in runs]), 1)
        out[f"{name}_same_batches"] = all(res["step_tokens"] == expected for res in runs)
    if "dpocache" in results:
        for name in results:
            if name != "dpocache":
                out[f"dpocache_over_{name}"] = round(out["dpocache_tok_s"] / out[f"{name}_tok_s"], 3)
                cpu = out["dpocache_tok_per_cpu_s"] / out[f"{name}_tok_per_cpu_s"]
                out[f"dpocache_over_{name}_cpu"] = round(cpu, 3)
                out[f"dpocache_rss_over_{name}"] = round(peaks["dpocache"] / peaks[name], 3)
    out["targets"] = targets(out)
    return out


def targets(out: dict) -> dict:
    """The stage-two targets this run can decide (None: a variant was not run)."""
    def ratio(key):
        return out.get(key)

    t = {}
    if ratio("dpocache_over_trl_precompute") is not None:
        t["tok_s_ge_1.5x_trl_precompute"] = ratio("dpocache_over_trl_precompute") >= 1.5
    if ratio("dpocache_over_bare") is not None:
        t["time_le_1.1x_bare"] = 1 / ratio("dpocache_over_bare") <= 1.1
    if out["model"] == "smollm2":
        if ratio("dpocache_rss_over_trl_live") is not None:
            t["rss_le_0.8x_trl_live"] = ratio("dpocache_rss_over_trl_live") <= 0.8
        if ratio("dpocache_rss_over_bare") is not None:
            t["rss_below_bare"] = ratio("dpocache_rss_over_bare") < 1.0
    return t


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.child, Path(args.plan))))
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = child_env(home)
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    try:
        model_dir = bench_model(work, args.model)
        stage_one = score_store(args, work, model_dir, home)
        plan_path = make_plan(args, work, model_dir, stage_one["store"])
        results: dict[str, list[dict]] = {name: [] for name in args.variants}
        for k in range(args.runs):
            for name in args.variants:
                cmd = [sys.executable, str(REPO / "bench" / "bench_train.py"), "--child", name, "--plan",
                       str(plan_path)]
                run = run_child(cmd, env=env, log=work / f"{name}-{k}.log", timeout=args.timeout)
                results[name].append(dict(run["json"][-1], peak_rss=run["peak_rss"]))
                print(f"bench_train: {name} run {k + 1}/{args.runs} done in {run['seconds']:.0f} s",
                      file=sys.stderr)
        plan = json.loads(plan_path.read_text())
        print(json.dumps(summarize(args, results, plan, stage_one, count_params(model_dir))))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

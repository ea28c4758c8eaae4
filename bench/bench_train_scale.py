#!/usr/bin/env python3
"""Stage two against store size: host memory, start-up and bytes read at N and 10 x N examples.

    python bench/bench_train_scale.py            # stores of 20,000 and 200,000 examples
    python bench/bench_train_scale.py --quick    # 2,000 and 20,000
    python bench/bench_train_scale.py --keep DIR # keep (and on a rerun, reuse) the stores in DIR

Each store is written by the real ``dpocache score`` (a micro Llama, hidden 16, 2 layers, and a word-level
tokenizer of ~130 ids, on short generated pairs of ~20-40 tokens a side: reference values are that tiny
real model's log-prob sums). Then ``dpocache train`` runs ``--steps`` optimizer steps from each store in
its own process (through ``bench/cli_probe.py``, which runs the real CLI and records what the process
used), ``--runs`` times per size, round-robin (the medians are reported), and on the large store once
more as 2 processes (``accelerate launch --multi_gpu --num_processes 2``, half the per-device batch, so
the same global batches). Measured per training process (per rank):

- peak RSS (``VmHWM`` in the process; for single runs also wait4's, which Linux floors at this script's
  own peak, so it is not the figure compared);
- time from process start to the first optimizer step: the moment the first ``metrics.jsonl`` line
  appears (the file is watched every 20 ms), and the process's CPU seconds at that moment (less
  sensitive to other load on the machine);
- steady tokens/s after ``--warmup`` steps (``metrics.jsonl``, see ``benchlib.train_rate``);
- bytes read from files while the command ran (``/proc/<pid>/io`` ``rchar``, counted after the heavy
  imports) less those of the same launch on a 40-example store: the reads that grow with the store
  ("store reads"); and the resident size of memory-mapped files under the store directory (reads
  through a map do not show in ``rchar``).

It also scores 40 examples as ``--num_shards 4`` parts (``--shard_index 0..3``, one store each) and
counts the examples each part scored. Prints one JSON line per measurement and a table with the
targets; the rows are appended to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (REPO, Stamps, bench_model, child_env, log_tail, median, plan_step_tokens, read_jsonl,
                      score_command, store_plan, synthetic_rows, train_rate, watch_child, write_jsonl)

PROBE = str(REPO / "bench" / "cli_probe.py")
BASELINE = 40  # examples of the store whose reads are subtracted (what a run reads besides the store's growth)
TRAIN = ["--loss_type", "dpo", "--beta", "0.1", "--learning_rate", "1e-4", "--warmup_ratio", "0",
         "--logging_steps", "1", "--checkpointing_steps", "none"]


class Run:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.env = dict(child_env(work / "home"), OMP_NUM_THREADS="1")  # micro model: nothing to split
        self.model = bench_model(work, "micro")
        self.rows: list[dict] = []

    def emit(self, row: dict) -> dict:
        row = {"bench": "train_scale", **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def child(self, name: str, cmd: list[str], poll=None) -> dict:
        log = self.work / f"{name}.log"
        res = watch_child(cmd, env=self.env, log=log, timeout=self.args.timeout, on_poll=poll, interval=0.02)
        if res["returncode"] != 0:
            raise RuntimeError(f"{name}: exit {res['returncode']} after {res['seconds']:.0f} s:\n{log_tail(log, 20)}")
        return res

    def store(self, n: int, *, seed: int = 1, extra: tuple = (), name: str | None = None) -> Path:
        name = name or f"store-{n}"
        data = self.work / f"pairs-{n}-{seed}.jsonl"
        if not data.exists():
            write_jsonl(data, synthetic_rows(n, seed=seed, profile="short"))
        store = self.work / name
        seconds = None
        if not (name.startswith("store-") and _rows(store) == n):  # a kept work folder's store is reused
            cmd = score_command(self.model, data, store, cache=self.work / "cache", batch=256, extra=extra)
            seconds = round(self.child(name, cmd)["seconds"], 1)
        self.emit({"kind": "store", "examples": n, "store": name, "rows": _rows(store), "seconds": seconds,
                   "store_bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file())})
        return store

    def train(self, store: Path, n: int, processes: int, repeat: int = 0) -> list[dict]:
        """One ``dpocache train`` launch; one row per rank (CPU seconds to the first step: single process only,
        a launcher's ranks are its children)."""
        a, tag = self.args, f"{n}-{processes}-{repeat}"
        out, probe = self.work / f"out-{tag}", self.work / f"probe-{tag}"
        metrics = out / "metrics.jsonl"
        first = FirstStep(metrics)
        command = [PROBE, "--probe_out", str(probe), "--probe_root", str(store), "--", "train",
                   "--model_name_or_path", str(self.model), "--store", str(store), "--output_dir", str(out),
                   "--per_device_train_batch_size", str(a.batch // processes), "--max_train_steps", str(a.steps),
                   *TRAIN]
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(29500 + os.getpid() % 1000)]
            self.env.setdefault("ACCELERATE_USE_CPU", "false" if _has_cuda() else "true")
        start = time.perf_counter()
        res = self.child(f"train-{tag}", launch + command, poll=first)
        plan = store_plan(store, self.model, batch=a.batch, steps=a.steps, compact=True)
        rate, source, _ = train_rate(read_jsonl(metrics), first.stamps.times, plan_step_tokens(plan), a.warmup)
        rows = []
        for rank in range(processes):
            got = json.loads(Path(f"{probe}.rank{rank}.json").read_text())
            main = rank == 0 and bool(first.stamps.times)
            rows.append({
                "kind": "train", "examples": n, "processes": processes, "rank": rank, "repeat": repeat,
                "peak_rss_mb": round(got["peak_rss"] / 2**20, 1),
                "wait4_peak_rss_mb": round(res["peak_rss"] / 2**20, 1) if processes == 1 else None,
                "first_step_s": round(first.stamps.times[0] - start, 2) if main else None,
                "first_step_cpu_s": round(first.cpu, 2) if main and processes == 1 and first.cpu else None,
                "tok_s": round(rate, 1) if rate else None, "rate_from": source,
                "rchar_mb": round(got["rchar"] / 2**20, 2), "read_bytes_mb": round(got["read_bytes"] / 2**20, 2),
                "mapped_store_mb": round((got["mapped_rss"] or 0) / 2**20, 2), "seconds": round(res["seconds"], 1)})
        shutil.rmtree(out, ignore_errors=True)
        return rows

    def shard_split(self, n: int = 40, parts: int = 4) -> dict:
        """Examples each of ``parts`` scoring parts (``--num_shards``/``--shard_index``) scored."""
        counts = []
        for i in range(parts):
            store = self.store(n, seed=7, extra=("--num_shards", parts, "--shard_index", i), name=f"part-{i}")
            counts.append(_rows(store))
        return self.emit({"kind": "shards", "examples": n, "parts": parts, "scored_per_part": counts})


def _rows(store: Path) -> int | None:
    manifest = store / "manifest.json"
    return sum(s["rows"] for s in json.loads(manifest.read_text())["shards"]) if manifest.is_file() else None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class FirstStep:
    """Stamps of ``metrics.jsonl`` lines, and the process's CPU seconds when the first one appeared."""

    def __init__(self, metrics: Path):
        self.stamps = Stamps(lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0)
        self.cpu = None

    def __call__(self, pid) -> None:
        self.stamps(pid)
        if pid and self.cpu is None and self.stamps.times:
            self.cpu = _cpu_seconds(pid)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def store_reads(rows: list[dict], baseline: list[dict]) -> None:
    """``store_mb``: a run's ``rchar`` less that of the same launch (processes, rank) on a 40-example store,
    i.e. the reads that grow with the store (imports and the model's files are in both)."""
    base = {(r["processes"], r["rank"]): r["rchar_mb"] for r in baseline}
    for r in rows:
        r["store_mb"] = round(r["rchar_mb"] - base[(r["processes"], r["rank"])], 2)


def typical(runs: list[dict]) -> dict:
    """The median of each figure over repeated launches of one configuration."""
    keys = ("peak_rss_mb", "first_step_s", "first_step_cpu_s", "tok_s", "store_mb")
    out = dict(runs[0])
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(median(values), 2) if values else None
    return out


def summarize(small: dict, large: dict, ddp: list[dict], shards: dict) -> dict:
    per_rank = sum(r["store_mb"] for r in ddp) / len(ddp)
    figures = {"rss_large_over_small": large["peak_rss_mb"] / small["peak_rss_mb"],
               "first_step_large_over_small": large["first_step_s"] / small["first_step_s"],
               "first_step_cpu_large_over_small": large["first_step_cpu_s"] / small["first_step_cpu_s"]
               if large["first_step_cpu_s"] and small["first_step_cpu_s"] else None,
               "rank_store_reads_2proc_over_1proc": per_rank / large["store_mb"] if large["store_mb"] > 0 else None}
    parts = shards["scored_per_part"]
    half = figures["rank_store_reads_2proc_over_1proc"]
    targets = {"rss_large_le_1.15x_small": figures["rss_large_over_small"] <= 1.15,
               "first_step_large_le_1.5x_small": figures["first_step_large_over_small"] <= 1.5,
               "rank_store_reads_about_half": half is not None and 0.4 <= half <= 0.6,
               "every_part_scores_8_to_12": all(8 <= c <= 12 for c in parts)}
    return {"bench": "train_scale_summary", "small": small["examples"], "large": large["examples"],
            **{k: round(v, 3) if v is not None else None for k, v in figures.items()}, "scored_per_part": parts,
            "targets": targets}


def table(runs: list[dict], summary: dict) -> str:
    """Markdown: the typical figures of each configuration, then the targets."""
    lines = ["| run | peak RSS MB | start to first step s (CPU s) | tokens/s | store reads MB (rchar MB) | "
             "mapped store MB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        rank = f", rank {r['rank']}" if r["processes"] > 1 else ""
        tok_s = "n/a" if r["tok_s"] is None else f"{r['tok_s']:,.0f}"
        first = "-" if r["first_step_s"] is None else f"{r['first_step_s']} ({r['first_step_cpu_s'] or '-'})"
        lines.append(f"| {r['examples']:,} examples, {r['processes']} process(es){rank} | {r['peak_rss_mb']:,.0f} | "
                     f"{first} | {tok_s} | {r['store_mb']} ({r['rchar_mb']}) | {r['mapped_store_mb']} |")
    t = summary["targets"]
    lines += ["", "| target | measured | met |", "| --- | --- | --- |",
              f"| peak RSS at {summary['large']:,} <= 1.15x {summary['small']:,} | "
              f"{summary['rss_large_over_small']}x | {_yes(t['rss_large_le_1.15x_small'])} |",
              f"| start to first step at {summary['large']:,} <= 1.5x {summary['small']:,} (CPU seconds: "
              f"{summary['first_step_cpu_large_over_small']}x) | {summary['first_step_large_over_small']}x | "
              f"{_yes(t['first_step_large_le_1.5x_small'])} |",
              f"| store reads per rank, 2 processes ~= half of 1 process (0.4-0.6x) | "
              f"{summary['rank_store_reads_2proc_over_1proc']}x | {_yes(t['rank_store_reads_about_half'])} |",
              f"| `--num_shards 4` over 40 examples: every part scores 8-12 | {summary['scored_per_part']} | "
              f"{_yes(t['every_part_scores_8_to_12'])} |"]
    return "\n".join(lines)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 examples")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (all processes together)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per training run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    parser.add_argument("--runs", type=int, default=3, help="single-process launches per store size (medians)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per child process")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results_train_scale.jsonl")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.small, args.large = 2_000, 20_000
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run = Run(args, work)
        stores = {n: run.store(n) for n in (BASELINE, args.small, args.large)}
        baseline = run.train(stores[BASELINE], BASELINE, 1) + run.train(stores[BASELINE], BASELINE, 2)
        single = {args.small: [], args.large: []}
        for repeat in range(args.runs):  # round-robin, so load drifts hit both sizes alike
            for n in single:
                single[n] += run.train(stores[n], n, 1, repeat)
        ddp = run.train(stores[args.large], args.large, 2)
        every = baseline + single[args.small] + single[args.large] + ddp
        store_reads(every, baseline)
        for row in every:
            run.emit(row)
        small, large = typical(single[args.small]), typical(single[args.large])
        summary = run.emit(summarize(small, large, ddp, run.shard_split()))
        with open(args.results, "a") as fh:
            for row in run.rows:
                fh.write(json.dumps(dict(row, quick=args.quick, date=time.strftime("%Y-%m-%d"))) + "\n")
        print(table(baseline + [small, large] + ddp, summary), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

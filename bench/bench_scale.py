#!/usr/bin/env python3
"""Stage one at scale: ``dpocache score`` (HF backend, a micro Llama) on N and 10 x N generated pairs.

For each size: wall time, peak RSS of the ``dpocache score`` process (wait4), store bytes per example,
and its RSS over time (sampled every 0.2 s; the RSS when scoring starts separates data preparation
from scoring). Prints one JSON line per size and a summary line with the RSS ratio (target: the
larger run's peak within 1.2x of the smaller one's).

    python bench/bench_scale.py                  # 10,000 and 100,000 pairs
    python bench/bench_scale.py --quick          # 1,000 and 10,000 pairs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, bench_model, child_env, score_command, synthetic_rows, write_jsonl

SAMPLE_SECONDS = 0.2


def run_sampled(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run ``cmd``, sampling its RSS; return peak RSS (wait4), seconds, samples and timed stdout lines."""
    import psutil

    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=REPO)

        def reader():
            for line in proc.stdout:
                lines.append((time.perf_counter() - t0, line.rstrip()))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        ps = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                samples.append((time.perf_counter() - t0, ps.memory_info().rss))
            except psutil.Error:
                pass
            if time.perf_counter() - t0 > timeout:
                proc.kill()
            time.sleep(SAMPLE_SECONDS)
        thread.join(5)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "samples": samples,
            "lines": lines}


def rss_at(samples: list[tuple[float, int]], t: float) -> int:
    """The last sampled RSS at or before ``t``."""
    before = [rss for ts, rss in samples if ts <= t]
    return before[-1] if before else 0


def score(pairs: int, work: Path, model_dir: Path, batch: int, timeout: float) -> dict:
    data = write_jsonl(work / f"pairs-{pairs}.jsonl", synthetic_rows(pairs, seed=1, profile="short"))
    store = work / f"store-{pairs}"
    cmd = score_command(model_dir, data, store, cache=work / f"cache-{pairs}", batch=batch)
    env = dict(child_env(work / "home"), OMP_NUM_THREADS="1")  # the micro model's ops are too small to split
    run = run_sampled(cmd, env, work / f"score-{pairs}.log", timeout)
    start = next((t for t, line in run["lines"] if "to score" in line), None)
    size = sum(p.stat().st_size for p in (store / "shards").iterdir())
    t_peak = max(run["samples"], key=lambda s: s[1])[0] if run["samples"] else None
    phase = None if t_peak is None or start is None else ("data preparation" if t_peak < start else "scoring")
    timeline = [(round(t, 1), round(rss / 2**20)) for t, rss in run["samples"][::max(1, len(run["samples"]) // 40)]]
    return {"bench": "scale", "pairs": pairs, "batch": batch, "seconds": round(run["seconds"], 1),
            "peak_rss_mb": round(run["peak_rss"] / 2**20),
            "rss_when_scoring_starts_mb": round(rss_at(run["samples"], start) / 2**20) if start else None,
            "seconds_before_scoring": round(start, 1) if start else None, "sampled_peak_phase": phase,
            "store_bytes_per_example": round(size / pairs), "rss_timeline_s_mb": timeline,
            "command": " ".join(cmd[1:]).replace(str(work), "$WORK")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256, help="sequences per reference forward")
    parser.add_argument("--quick", action="store_true", help="1,000 and 10,000 pairs")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", help="work directory to keep (default: temporary)")
    args = parser.parse_args(argv)
    if args.quick:
        args.small, args.large = 1_000, 10_000
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = bench_model(work, "micro")
        results = [score(n, work, model_dir, args.batch, args.timeout) for n in (args.small, args.large)]
        for res in results:
            print(json.dumps(res))
        small, large = results
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        print(json.dumps({"bench": "scale_summary", "small": small["pairs"], "large": large["pairs"],
                          "quick": args.quick, "peak_rss_ratio": round(ratio, 3),
                          "seconds_ratio": round(large["seconds"] / small["seconds"], 2),
                          "targets": {"rss_large_le_1.2x_small": ratio <= 1.2}}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

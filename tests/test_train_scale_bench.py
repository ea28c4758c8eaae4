"""`bench/bench_train_scale.py` end to end at toy sizes: real stores from `dpocache score`, stage two in 1 and 2
processes (gloo) through the CLI probe, the `--num_shards 4` split; rows, summary and target table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_scale_bench_reports_memory_startup_reads_and_parts(tmp_path):
    results = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "bench_train_scale.py"), "--small", "60", "--large", "240",
           "--steps", "4", "--warmup", "1", "--runs", "2", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in printed] == [r["bench"] for r in rows]

    stores = {r["examples"]: r for r in rows if r.get("kind") == "store" and r["store"].startswith("store-")}
    assert {n: s["rows"] for n, s in stores.items()} == {40: 40, 60: 60, 240: 240}
    assert stores[240]["store_bytes"] > stores[60]["store_bytes"]

    train = [r for r in rows if r.get("kind") == "train"]
    launches = sorted((r["examples"], r["processes"], r["rank"], r["repeat"]) for r in train)
    assert launches == sorted([(40, 1, 0, 0), (40, 2, 0, 0), (40, 2, 1, 0), (240, 2, 0, 0), (240, 2, 1, 0)]
                              + [(n, 1, 0, k) for n in (60, 240) for k in (0, 1)])
    for r in train:
        assert r["peak_rss_mb"] > 100 and r["rchar_mb"] > 0, r
        assert (r["first_step_s"] > 0) if r["rank"] == 0 else r["first_step_s"] is None
        if r["processes"] == 1:  # wait4's figure also holds the launching process's peak: never below
            assert r["peak_rss_mb"] <= r["wait4_peak_rss_mb"] + 1
            assert 0 < r["first_step_cpu_s"]
    store_mb = {(r["examples"], r["processes"], r["rank"]): r["store_mb"] for r in train}
    assert all(store_mb[(40, p, k)] == 0 for p, k in ((1, 0), (2, 0), (2, 1)))  # the baseline itself
    assert store_mb[(240, 1, 0)] > store_mb[(60, 1, 0)] > 0  # reads grow with the store
    peak = {n: sorted(r["peak_rss_mb"] for r in train if r["examples"] == n and r["processes"] == 1) for n in (60, 240)}

    parts = next(r for r in rows if r.get("kind") == "shards")
    assert parts["parts"] == 4 and sum(parts["scored_per_part"]) == 40  # every example scored exactly once
    summary = rows[-1]
    assert summary["bench"] == "train_scale_summary" and (summary["small"], summary["large"]) == (60, 240)
    median = {n: (v[0] + v[1]) / 2 for n, v in peak.items()}  # two runs each: the median is the mean
    assert summary["rss_large_over_small"] == pytest.approx(median[240] / median[60], abs=2e-3)
    assert summary["targets"]["every_part_scores_8_to_12"] == all(8 <= c <= 12 for c in parts["scored_per_part"])
    for needle in ("| 240 examples, 2 process(es), rank 1 |", "| peak RSS at 240 <= 1.15x 60 |",
                   "every part scores 8-12"):
        assert needle in proc.stderr

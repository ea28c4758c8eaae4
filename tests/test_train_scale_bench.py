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
           "--steps", "4", "--warmup", "1", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in printed] == [r["bench"] for r in rows]

    stores = {r["examples"]: r for r in rows if r.get("kind") == "store" and r["store"].startswith("store-")}
    assert {n: s["rows"] for n, s in stores.items()} == {40: 40, 60: 60, 240: 240}
    assert stores[240]["store_bytes"] > stores[60]["store_bytes"]

    train = {(r["examples"], r["processes"], r["rank"]): r for r in rows if r.get("kind") == "train"}
    assert set(train) == {(40, 1, 0), (40, 2, 0), (40, 2, 1), (60, 1, 0), (240, 1, 0), (240, 2, 0), (240, 2, 1)}
    for key, r in train.items():
        assert r["peak_rss_mb"] > 100 and r["rchar_mb"] > 0, r
        assert (r["first_step_s"] > 0) if key[2] == 0 else r["first_step_s"] is None
        if key[1] == 1:  # the probe's own peak and wait4's agree for a single process
            assert r["peak_rss_mb"] == pytest.approx(r["wait4_peak_rss_mb"], rel=0.05)
    assert all(train[(40, p, k)]["store_mb"] == 0 for p, k in ((1, 0), (2, 0), (2, 1)))  # the baseline itself
    assert train[(240, 1, 0)]["store_mb"] > train[(60, 1, 0)]["store_mb"] > 0  # reads grow with the store

    parts = next(r for r in rows if r.get("kind") == "shards")
    assert parts["parts"] == 4 and sum(parts["scored_per_part"]) == 40  # every example scored exactly once
    summary = rows[-1]
    assert summary["bench"] == "train_scale_summary" and (summary["small"], summary["large"]) == (60, 240)
    assert summary["rss_large_over_small"] == pytest.approx(
        train[(240, 1, 0)]["peak_rss_mb"] / train[(60, 1, 0)]["peak_rss_mb"], abs=1e-3)
    assert summary["targets"]["every_part_scores_8_to_12"] == all(8 <= c <= 12 for c in parts["scored_per_part"])
    for needle in ("| 240 examples, 2 process(es), rank 1 |", "| peak RSS at 240 <= 1.15x 60 |",
                   "every part scores 8-12"):
        assert needle in proc.stderr

"""The GPU benchmark's CPU smoke run (`bench/gpu/run.py --smoke`): every step of the GPU run on tiny models,
one row per step in the JSONL, CUDA-only variants skipped with their reason, the ratio table at the end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST = ("score", "forward", "dpocache", "trl", "bare", "packing", "liger", "compile")
SECOND = ("dpocache", "trl", "bare")


@pytest.mark.slow
def test_gpu_bench_smoke_writes_rows_and_the_target_table(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu" / "run.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert all(r["bench"] == "gpu" for r in rows)
    by_step = {(r.get("shape"), r["variant"]): r for r in rows}
    assert by_step[(None, "machine")]["smoke"] is True
    for step in ("build", "prepare"):
        assert by_step[(None, step)]["status"] == "ok", by_step[(None, step)]
    assert set(by_step[(None, "build")]["params"]) == {"tiny", "tiny-wide"}
    expected = {("tiny", v) for v in FIRST} | {("tiny-wide", v) for v in SECOND}
    assert {k for k in by_step if k[0]} == expected
    assert len([r for r in rows if r.get("shape")]) == len(expected)  # one repeat in the smoke run

    for variant in ("liger", "compile"):  # CUDA-only: a row with the reason, not a failure
        assert by_step[("tiny", variant)]["status"] == "skipped"
        assert by_step[("tiny", variant)]["reason"] == "needs CUDA"
    for shape, variant in {("tiny", "forward")} | {(s, v) for s in ("tiny", "tiny-wide") for v in SECOND}:
        row = by_step[(shape, variant)]
        assert row["status"] == "ok", row
        assert row["tok_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["peak_gpu_bytes"] is None and row["mfu"] is None  # no GPU, so no peak FLOP/s either
    for shape in ("tiny", "tiny-wide"):  # the comparisons ran on identical batches
        assert by_step[(shape, "bare")]["same_batches"] is True
        assert by_step[(shape, "trl")]["same_batches"] is True
    for variant in ("score", "packing"):  # flags and probes that depend on the version: a row either way
        row = by_step[("tiny", variant)]
        assert row["status"] in ("ok", "failed"), row
        assert row.get("tok_s", 0) > 0 if row["status"] == "ok" else row["error"].strip()

    ratios = by_step[(None, "summary")]["ratios"]
    assert set(ratios["tiny"]) == {"stage one / bare forward", "stage two / TRL precompute",
                                   "stage two / bare loop", "packing / padded"}
    assert set(ratios["tiny-wide"]) == {"stage one / bare forward", "stage two / TRL precompute",
                                        "stage two / bare loop", "memory / TRL precompute"}
    for shape in ("tiny", "tiny-wide"):
        got = ratios[shape]["stage two / TRL precompute"]
        want = by_step[(shape, "dpocache")]["tok_s"] / by_step[(shape, "trl")]["tok_s"]
        assert got["ratio"] == pytest.approx(want, abs=1e-3) and got["met"] == (got["ratio"] >= 1.3)
    assert ratios["tiny-wide"]["memory / TRL precompute"]["ratio"] is None  # no GPU memory on CPU

    table = proc.stdout
    for heading in ("### tiny (", "### tiny-wide (", "### Targets"):
        assert heading in table
    assert "| tiny | stage two / TRL precompute |" in table and "| tiny-wide | memory / TRL precompute |" in table
    assert table.count("skipped: needs CUDA") == 2

"""The padding benchmark runs end to end (quick sizes, real data layer) and prints its JSON line."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_padding_quick_prints_one_json_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_padding.py"), "--quick", "--tokenizer", "words"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == "padding" and out["pairs"] == 256 and out["batch"] == 8
    naive, grouped = out["naive_padded_fraction"], out["grouped_padded_fraction"]
    assert 0.0 < grouped < naive < 1.0
    assert abs(out["padding_reduction"] - (1 - grouped / naive)) < 2e-3  # fractions are rounded to 4 digits
    assert out["targets"] == {"padding_cut_ge_30pct": out["padding_reduction"] >= 0.30}

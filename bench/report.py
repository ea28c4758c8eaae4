#!/usr/bin/env python3
"""Collect benchmark JSON lines and write BENCHMARKS.md from them.

    python bench/report.py collect RESULTS.jsonl -- python bench/bench_padding.py --quick
    python bench/report.py write RESULTS.jsonl BENCHMARKS.md

``collect`` runs one command, stamps each JSON line it prints with the command line and appends it to
the results file (a failing command is recorded as ``{"bench": "error"}`` and the exit code is kept).
``write`` renders the tables (see ``report_tables.py``) with the machine description and commands, and the
reliability trials from ``results_reliability.jsonl`` next to the results file (``bench_reliability.py`` writes
it; it is run on its own); a hand-written "## Profiles and notes" section of the existing report is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine  # noqa: E402


def collect(results: Path, cmd: list[str]) -> int:
    """Run ``cmd`` (from the repository root); append its JSON lines, stamped, to ``results``."""
    shown = " ".join(["python" if Path(cmd[0]).name.startswith("python") else shlex.quote(cmd[0])]
                     + [shlex.quote(c) for c in cmd[1:]])
    print(f"+ {shown}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    lines = []
    for line in proc.stdout.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "bench" in value:
            lines.append(dict(value, command=shown, command_seconds=seconds))
    if proc.returncode != 0:
        lines.append({"bench": "error", "command": shown, "returncode": proc.returncode, "command_seconds": seconds})
    with open(results, "a") as fh:
        for value in lines:
            fh.write(json.dumps(value) + "\n")
    print(f"  {len(lines)} result line(s) in {seconds} s (exit {proc.returncode})", file=sys.stderr, flush=True)
    return proc.returncode


def load(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("collect", help="run a command and append its JSON lines")
    c.add_argument("results", type=Path)
    c.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    m = sub.add_parser("machine", help="append the machine description")
    m.add_argument("results", type=Path)
    w = sub.add_parser("write", help="render the results into a BENCHMARKS.md")
    w.add_argument("results", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--run_command", default="bash bench/run_all.sh")
    args = parser.parse_args(argv)
    if args.action == "collect":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("collect: no command after --")
        return collect(args.results, cmd)
    if args.action == "machine":
        with open(args.results, "a") as fh:
            fh.write(json.dumps(dict(machine(), date=time.strftime("%Y-%m-%d"))) + "\n")
        return 0
    from report_tables import render

    rows = load(args.results)
    previous = args.out.read_text() if args.out.exists() else ""
    trials = args.results.parent / "results_reliability.jsonl"  # bench_reliability.py, run on its own
    args.out.write_text(render(rows, args.run_command, previous, load(trials) if trials.is_file() else []))
    errors = [r for r in rows if r["bench"] == "error"]
    for r in errors:
        print(f"failed: {r['command']} (exit {r['returncode']})", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reliability trials: what dpocache guarantees under kills, preemption, concurrent writers and hostile files,
re-run through the real command line (``python -m dpocache.cli``) and counted.

Every trial starts from one workspace built here (``reliability_runs.Workspace``): SmolLM2's tokenizer, a tiny
random Llama (``tests/conftest.py: make_tiny_llama``), 48 preference pairs for stage one (``--rows_per_shard 2``:
24 shards) and 32 for stage two (16 steps of 2 pairs, a checkpoint every 2 steps, the newest 2 kept), and the
uninterrupted results every trial is compared with: a store scored without interruption, and a training run that
was never stopped. Stores are compared by reading every listed shard with pyarrow and keying each row by its
example hash (all values, exactly); training runs by every logged metric except timings and every tensor of the
final ``model.safetensors``, bit for bit.

Trials (``--trials N`` sets the number of stage-one kills, 12 by default; the other kill counts keep the default
proportions 12 : 8 : 5 : 3):

- **stage one, SIGKILL at a random moment**: ``dpocache score`` is killed at a seeded random moment of its scoring
  (after a random number of the chunks it has left, plus a random part of one chunk's time); the store it leaves
  must open, pass ``inspect --verify`` and hold only rows equal to the uninterrupted store's. The same command is
  run again; reruns are themselves killed (up to 6 kills in a row), and the last one runs to completion: the
  final store must hold exactly the uninterrupted store's rows (same examples, same values, no row twice, no
  file left behind). A kill passes when both its own check and its sequence's final comparison pass.
- **stage one, SIGKILL inside a shard write**: the same (up to 4 kills in a row), but the kill is sent at a random
  point of the next shard write (0-10 ms after its temporary file appears); it counts when it left the write
  unfinished (a temporary shard, a shard renamed but not yet in the manifest, or a manifest being replaced);
  kills that landed after the commit are not counted and are tried again.
- **stage two, SIGKILL at a random step**: ``dpocache train`` is killed at a seeded random step (and a random
  moment inside it); the metrics logged so far must equal the uninterrupted run's and every complete checkpoint
  must verify and hold finite weights; ``--resume_from_checkpoint auto`` reruns (killed again, up to 3 in a row,
  then run to completion) must end with every metric and every weight bit-identical to the uninterrupted run.
- **stage two, SIGKILL inside a checkpoint write**: the same, killed at a random point (0-100 ms) after a
  checkpoint's staging directory appears; it counts when the staging directory was left unfinished.
- **preemption**: SIGTERM and SIGUSR1 to ``train`` at a random step and to ``score`` at a random moment; the
  command must exit 75 with a message naming the signal (no traceback), ``train`` having written a verified
  checkpoint at the step it stopped after and no model, ``score`` having left a verified store; the rerun
  (``--resume_from_checkpoint auto`` for ``train``, resuming at that step; the same command for ``score``, reusing
  every row kept) must complete and match the uninterrupted result.
- **concurrent writers**: two ``score`` processes started together on one empty store; both must succeed and the
  store must verify and hold the uninterrupted store's examples with identical values (equal duplicates allowed).
- **corruption**: the table of ``reliability_cases.py`` (damaged stores, checkpoints and inputs, full disks on a
  real small tmpfs): each command must fail (or recover, where dpocache is meant to) without a traceback, with a
  message naming the file, option or step.

Prints a table ``trial | passed/total`` and writes one JSON row per trial to ``--out``
(``bench/results_reliability.jsonl`` by default; ``--quick`` runs a handful of each into a temporary folder).

    python bench/bench_reliability.py              # default counts, about 15 minutes on 2 cores
    python bench/bench_reliability.py --quick      # a smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import REPO  # noqa: E402
import reliability_cases_more  # noqa: E402,F401 - registers the checkpoint, input and full-disk cases
from reliability_cases import CASES, run_case  # noqa: E402
from report_tables import reliability_table  # noqa: E402
from reliability_runs import (CHUNK_ROWS, SCORE_PAIRS, SIGNALS, TRAIN_STEPS, Child, Workspace, leftovers,  # noqa: E402
                              stage_one_equal, stage_one_partial_ok, stage_two_equal, stage_two_partial_ok,
                              store_rows)

LABELS = {
    "stage_one_kill": "stage one: SIGKILL at a random moment, rerun: store identical to an uninterrupted one",
    "stage_one_write_kill": "stage one: SIGKILL inside a shard write, rerun: identical store",
    "stage_two_kill": "stage two: SIGKILL at a random step, resume: bit-identical losses and weights",
    "stage_two_checkpoint_kill": "stage two: SIGKILL inside a checkpoint write, resume: bit-identical",
    "preempt_train": "preemption: SIGTERM/SIGUSR1 to train: exit 75, resume: bit-identical",
    "preempt_score": "preemption: SIGTERM/SIGUSR1 to score: exit 75, rerun: identical store",
    "concurrent_score": "concurrent writers: two score processes on one store: identical store",
    "corruption_store": "corruption: damaged stores (train, inspect --verify, score)",
    "corruption_checkpoint": "corruption: damaged checkpoints (resume PATH / auto)",
    "corruption_input": "corruption: bad options, datasets, configs, models",
    "corruption_disk": "corruption: full disks (real small tmpfs)",
}
EXIT_PREEMPTED = 75


@dataclass
class Result:
    trial: str
    ok: bool
    detail: str = ""
    ran: bool = True
    notes: list = field(default_factory=list)


# -- stage one ---------------------------------------------------------------------------------------------
def stored_rows(store: Path) -> int:
    try:
        return sum(s["rows"] for s in json.loads((store / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def shard_write_state(store: Path) -> str | None:
    """Where a kill left a shard write: None when no write was unfinished."""
    shards = store / "shards"
    names = [p.name for p in shards.iterdir()] if shards.is_dir() else []
    if any(n.startswith(".tmp-") for n in names):
        return "temporary shard written, not renamed"
    if any(n.startswith(".tmp-manifest") for n in os.listdir(store)):
        return "manifest being replaced"
    if any(p.startswith("shards/") for p in leftovers(store)):
        return "shard renamed, manifest not updated"
    return None


def scoring(child: Child) -> bool:
    """Wait until a score run starts scoring (False: it ended first)."""
    return child.wait_for(lambda: "to score with" in child.output())


def pause(child: Child, seconds: float) -> None:
    """Sleep ``seconds`` or until the run ends."""
    end = time.perf_counter() + seconds
    child.wait_for(lambda: time.perf_counter() >= end)


def kill_score(ws: Workspace, child: Child, store: Path, rng: random.Random, in_write: bool) -> str | None:
    """Kill a score run at a seeded random moment of its scoring: after a random number of the chunks it has left,
    plus a random part of one chunk's time (``in_write``: then at the next shard write). Returns where the kill
    landed, or None when the run ended first (``in_write``: "miss" when the write had finished)."""
    if not scoring(child):
        return None
    base = stored_rows(store)
    chunks = rng.randrange(max(1, (SCORE_PAIRS - base) // CHUNK_ROWS))
    if not child.wait_for(lambda: stored_rows(store) >= base + chunks * CHUNK_ROWS):
        return None
    pause(child, rng.uniform(0, ws.score_seconds * CHUNK_ROWS / SCORE_PAIRS))
    if in_write:
        shards = store / "shards"
        seen = child.wait_for(lambda: shards.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(shards)),
                              interval=0.0002)
        if not seen:
            return None
        time.sleep(rng.uniform(0, 0.01))  # a random point of the write: data, fsync, rename, manifest
    if not child.running():
        return None
    child.signal(signal.SIGKILL)
    child.wait()
    if in_write:
        return shard_write_state(store) or "miss"
    return f"with {stored_rows(store) - base} of {SCORE_PAIRS - base} rows stored"


def kill_sequences(ws: Workspace, name: str, trial: str, kills: int, start, place, partial, final) -> list[Result]:
    """Place ``kills`` kills as sequences: each run of a sequence is killed by ``place(child, folder)`` (returns
    where it landed, "miss" for a kill that does not count, None when the run ended first), checked by
    ``partial(folder)``; the sequence's last run completes and is judged by ``final(folder, code, child)``. When a
    run completes before every kill is placed, a new sequence starts in a new folder."""
    results, misses = [], 0
    for part in range(kills + 2):
        if len(results) >= kills:
            break
        folder = ws.fresh(f"{name}.{part}")
        placed, verdict = [], ["no run completed"]
        for run in range(3 * kills + 4):
            child = start(folder, run)
            where = place(child, folder) if len(results) + len(placed) < kills else None
            if where is None:
                code = child.wait()
                verdict = final(folder, code, child)
                break
            if where == "miss":
                misses += 1
                continue
            placed.append((where, partial(folder)))
        results += [Result(trial, not problems and not verdict, f"{folder.name}: killed {where}: "
                           + "; ".join(problems + verdict), notes=[where]) for where, problems in placed]
    if misses and results:
        results[0].notes.append(f"{misses} kill(s) landed after the write had finished and were not counted")
    return results


def stage_one_sequence(ws: Workspace, name: str, kills: int, rng: random.Random, in_write: bool) -> list[Result]:
    return kill_sequences(
        ws, name, "stage_one_write_kill" if in_write else "stage_one_kill", kills,
        start=lambda folder, run: Child(ws, ws.score_args(folder / "store"), folder / f"run{run}.log"),
        place=lambda child, folder: kill_score(ws, child, folder / "store", rng, in_write),
        partial=lambda folder: stage_one_partial_ok(folder / "store", ws.ref_rows),
        final=lambda folder, code, child: stage_one_equal(folder / "store", ws.ref_rows) if code == 0
        else [f"rerun exit {code}: {tail(child)}"])


def tail(child: Child) -> str:
    lines = [line for line in child.output().splitlines() if line.strip()]
    return " | ".join(lines[-2:])[-400:]


# -- stage two ---------------------------------------------------------------------------------------------
def logged(out: Path, inode: int | None) -> int:
    """Lines of metrics.jsonl written by the current run (its writer replaces the file when it starts)."""
    path = out / "metrics.jsonl"
    try:
        if inode is not None and path.stat().st_ino == inode:
            return 0
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def inode_of(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def resume_step(out: Path) -> int:
    from dpocache.stages.train.checkpoint import complete_checkpoints, verify_checkpoint

    good = [p for p in complete_checkpoints(out) if verify_checkpoint(p) is None]
    return int(good[-1].name.split("_")[1]) if good else 0


def kill_train(child: Child, out: Path, inode: int | None, rng: random.Random, in_checkpoint: bool) -> str | None:
    start = resume_step(out)
    if start >= TRAIN_STEPS - 1:
        return None
    if not in_checkpoint:
        step = rng.randint(start + 1, TRAIN_STEPS - 1)
        if not child.wait_for(lambda: logged(out, inode) >= step, interval=0.005):
            return None
        time.sleep(rng.uniform(0, 0.3))
        if not child.running():
            return None
        child.signal(signal.SIGKILL)
        child.wait()
        return f"resumed at step {start}, killed after step {logged(out, None)}"
    root = out / "checkpoints"
    steps = [s for s in range(2, TRAIN_STEPS, 2) if s > start]
    for target in steps[rng.randrange(len(steps)):]:
        staging = root / f".tmp-step_{target:08d}-{child.pid}"
        final = root / f"step_{target:08d}"
        def reached(staging=staging, final=final, target=target) -> bool:
            return staging.exists() or (final.exists() and logged(out, inode) >= target)

        if not child.wait_for(reached, interval=0.0002):
            return None
        if not staging.exists():
            continue
        time.sleep(rng.uniform(0, 0.1))  # a random point of the write (a write that ends first: the next one)
        if staging.exists():
            child.signal(signal.SIGKILL)
            child.wait()
            if staging.is_dir():
                written = sorted(p.name for p in staging.iterdir())
                return f"inside the write of step_{target:08d} (files there: {', '.join(written) or 'none'})"
            return "miss"
    return None


def stage_two_sequence(ws: Workspace, name: str, kills: int, rng: random.Random, in_checkpoint: bool) -> list[Result]:
    inodes = {}

    def start(folder: Path, run: int) -> Child:
        out = folder / "out"
        inodes[folder] = inode_of(out / "metrics.jsonl")
        extra = ["--resume_from_checkpoint", "auto"] if run else []
        return Child(ws, ws.train_args(out, *extra), folder / f"run{run}.log")

    return kill_sequences(
        ws, name, "stage_two_checkpoint_kill" if in_checkpoint else "stage_two_kill", kills, start,
        place=lambda child, folder: kill_train(child, folder / "out", inodes[folder], rng, in_checkpoint),
        partial=lambda folder: stage_two_partial_ok(folder / "out", ws.ref_metrics),
        final=lambda folder, code, child: stage_two_equal(folder / "out", ws.ref_train) if code == 0
        else [f"resume exit {code}: {tail(child)}"])


# -- preemption and concurrency ------------------------------------------------------------------------------
def preempted_properly(child: Child, code: int, sig: str, command: str) -> list[str]:
    text = child.output()
    problems = [] if code == EXIT_PREEMPTED else [f"exit {code}, not {EXIT_PREEMPTED}: {tail(child)}"]
    if f"dpocache {command}: preempted: {sig}" not in text:
        problems.append("no 'preempted' message naming the signal")
    if "Traceback" in text:
        problems.append("a traceback")
    return problems


def preempt_train(ws: Workspace, name: str, sig: str, rng: random.Random) -> list[Result]:
    out = ws.fresh(name) / "out"
    child = Child(ws, ws.train_args(out), out.parent / "run0.log")
    step = rng.randint(2, TRAIN_STEPS - 4)
    child.wait_for(lambda: logged(out, None) >= step, interval=0.005)
    child.signal(SIGNALS[sig])
    problems = preempted_properly(child, code := child.wait(), sig, "train")
    found = re.search(r"after step (\d+) of", child.output())
    stopped = int(found.group(1)) if found else None
    if code == EXIT_PREEMPTED:
        if (out / "model.safetensors").exists():
            problems.append("a model was saved by a preempted run")
        if stopped is None or resume_step(out) != stopped:
            problems.append(f"no verified checkpoint at the step it stopped after ({stopped})")
        problems += stage_two_partial_ok(out, ws.ref_metrics)
    again = Child(ws, ws.train_args(out, "--resume_from_checkpoint", "auto"), out.parent / "run1.log")
    rerun = again.wait()
    problems += stage_two_equal(out, ws.ref_train) if rerun == 0 else [f"resume exit {rerun}: {tail(again)}"]
    if rerun == 0 and stopped is not None and f"at step {stopped}" not in again.output():
        problems.append(f"the rerun did not resume at step {stopped}")
    return [Result("preempt_train", not problems, f"{name}: {sig} at step {step}: " + "; ".join(problems),
                   notes=[f"{sig} after step {step}, stopped after step {stopped}"])]


def signal_score(ws: Workspace, store: Path, sig: str, chunks: int) -> tuple[Child, int]:
    """Send ``sig`` to a score run once ``chunks`` chunks are stored; returns the run and its exit code."""
    child = Child(ws, ws.score_args(store), store.parent / "run0.log")
    scoring(child)
    child.wait_for(lambda: stored_rows(store) >= chunks * CHUNK_ROWS)
    child.signal(SIGNALS[sig])
    return child, child.wait()


def preempt_score(ws: Workspace, name: str, sig: str, rng: random.Random) -> list[Result]:
    for attempt in range(3):  # a run that finished before the signal arrived is tried again, earlier
        store = ws.fresh(f"{name}-{attempt}") / "store"
        chunks = rng.randrange(SCORE_PAIRS // CHUNK_ROWS // (2 + attempt))
        child, code = signal_score(ws, store, sig, chunks)
        if code != 0:
            break
    problems = preempted_properly(child, code, sig, "score")
    kept = stored_rows(store)
    problems += stage_one_partial_ok(store, ws.ref_rows)
    again = Child(ws, ws.score_args(store), store.parent / "run1.log")
    rerun = again.wait()
    problems += stage_one_equal(store, ws.ref_rows) if rerun == 0 else [f"rerun exit {rerun}: {tail(again)}"]
    if rerun == 0 and f"{kept} examples reused" not in again.output():
        problems.append(f"the rerun did not reuse the {kept} rows kept")
    return [Result("preempt_score", not problems, f"{name}: {sig} after {chunks} chunk(s): " + "; ".join(problems),
                   notes=[f"{sig} after {chunks} chunk(s), {kept} rows kept"])]


def concurrent_score(ws: Workspace, name: str, rng: random.Random) -> list[Result]:
    store = ws.fresh(name) / "store"
    children = [Child(ws, ws.score_args(store), store.parent / f"writer{i}.log") for i in range(2)]
    codes = [c.wait() for c in children]
    problems = [f"writer {i} exit {code}: {tail(c)}" for i, (c, code) in enumerate(zip(children, codes)) if code]
    if not problems:
        problems = stage_one_equal(store, ws.ref_rows, duplicates_allowed=True)
    rows, count = store_rows(store) if (store / "manifest.json").exists() else ({}, 0)
    return [Result("concurrent_score", not problems, f"{name}: " + "; ".join(problems),
                   notes=[f"{count} rows for {len(rows)} examples"])]


# -- corruption ------------------------------------------------------------------------------------------------
QUICK_CASES = {"train: row resealed with a NaN log-prob sum",
               "resume auto: newest model.safetensors truncated (falls back)", "train --beta inf",
               "train: a checkpoint onto a full disk (1 MiB tmpfs)"}


def corruption(ws: Workspace, index: int) -> list[Result]:
    c = CASES[index]
    d = ws.fresh(f"case{index:02d}")
    try:
        outcome = run_case(ws, c, d)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be prepared is reported, not fatal
        return [Result(f"corruption_{c.group}", False, f"{c.name}: the case could not run: {exc!r}")]
    return [Result(f"corruption_{c.group}", outcome.passed, f"{c.name}: {outcome.why}", ran=outcome.ran,
                   notes=[f"{c.name}: exit {outcome.code}"])]


# -- the run -----------------------------------------------------------------------------------------------------
def split(total: int, length: int) -> list[int]:
    """``total`` kills as sequences of at most ``length``."""
    return [min(length, total - k) for k in range(0, total, length)]


def plan(args) -> list[tuple[str, callable]]:
    n = 1 if args.quick else args.trials
    counts = {"s1": n, "s1w": max(1, round(n * 8 / 12)), "s2": max(1, round(n * 5 / 12)),
              "s2c": max(1, round(n * 3 / 12))}
    if args.quick:
        counts.update(s1w=1, s2=1, s2c=1)
    units = []
    for key, kills, length, fn, flag in (("s1", counts["s1"], 6, stage_one_sequence, False),
                                         ("s1w", counts["s1w"], 4, stage_one_sequence, True),
                                         ("s2", counts["s2"], 3, stage_two_sequence, False),
                                         ("s2c", counts["s2c"], 3, stage_two_sequence, True)):
        for i, k in enumerate(split(kills, length)):
            units.append((f"{key}-{i}", lambda ws, rng, n=f"{key}-{i}", k=k, fn=fn, flag=flag: fn(ws, n, k, rng,
                                                                                                    flag)))
    signals = ["SIGTERM"] if args.quick else ["SIGTERM", "SIGUSR1"]
    for sig in signals:
        units.append((f"pt-{sig}", lambda ws, rng, s=sig: preempt_train(ws, f"pt-{s}", s, rng)))
    for sig in (["SIGUSR1"] if args.quick else signals):
        units.append((f"ps-{sig}", lambda ws, rng, s=sig: preempt_score(ws, f"ps-{s}", s, rng)))
    for i in range(1 if args.quick else 2):
        units.append((f"cw-{i}", lambda ws, rng, i=i: concurrent_score(ws, f"cw-{i}", rng)))
    for i, c in enumerate(CASES):
        if not args.quick or c.name in QUICK_CASES:
            units.append((f"case{i:02d}", lambda ws, rng, i=i: corruption(ws, i)))
    return units


def run_unit(ws: Workspace, seed: int, name: str, fn) -> tuple[str, list[Result], float]:
    started = time.perf_counter()
    try:
        results = fn(ws, random.Random(f"{seed}-{name}"))
    except Exception as exc:  # noqa: BLE001 - one broken trial is a failed trial, the others still run
        trial = {"s1": "stage_one_kill", "s1w": "stage_one_write_kill", "s2": "stage_two_kill",
                 "s2c": "stage_two_checkpoint_kill", "pt": "preempt_train", "ps": "preempt_score",
                 "cw": "concurrent_score"}.get(name.split("-")[0], "corruption_store")
        results = [Result(trial, False, f"{name}: the trial raised {exc!r}")]
    print(f"  {name}: {sum(r.ok for r in results)}/{len(results)} in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return name, results, time.perf_counter() - started


def summarize(results: list[Result], meta: dict) -> list[dict]:
    rows = []
    for key, label in LABELS.items():
        mine = [r for r in results if r.trial == key]
        ran = [r for r in mine if r.ran]
        if not mine:
            continue
        rows.append(dict(meta, bench="reliability", trial=key, label=label, passed=sum(r.ok for r in ran),
                         total=len(ran), not_run=len(mine) - len(ran),
                         failures=[r.detail for r in ran if not r.ok],
                         notes=[n for r in mine for n in r.notes]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="stage-one kills (the other counts scale with it)")
    parser.add_argument("--quick", action="store_true", help="a handful of each trial (smoke test)")
    parser.add_argument("--jobs", type=int, default=2, help="trials run at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON rows (default bench/results_reliability.jsonl; with --quick "
                                                 "a file in the work folder)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="dpocache-reliability-"))
    out = args.out or (work / "results_reliability.jsonl" if args.quick else REPO / "bench" /
                       "results_reliability.jsonl")
    print(f"building the workspace in {work}", file=sys.stderr, flush=True)
    ws = Workspace(work).build()
    units = plan(args)
    print(f"{len(units)} trial unit(s), {args.jobs} at a time", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda u: run_unit(ws, args.seed, *u), units))
    results = [r for _, rs, _ in done for r in rs]
    command = "python bench/bench_reliability.py" + (" --quick" if args.quick else "") + \
        (f" --trials {args.trials}" if args.trials != 12 and not args.quick else "")
    meta = {"command": command, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "seed": args.seed,
            "seconds": round(time.perf_counter() - started)}
    rows = summarize(results, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n".join(reliability_table(rows)))
    for r in rows:
        for failure in r["failures"]:
            print(f"FAILED {r['trial']}: {failure}")
    print(f"{sum(r['passed'] for r in rows)}/{sum(r['total'] for r in rows)} passed in {meta['seconds']} s; "
          f"rows in {out}", file=sys.stderr)
    if args.work is None and not args.quick:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["passed"] == r["total"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

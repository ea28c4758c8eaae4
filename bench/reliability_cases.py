"""The corruption cases of ``bench_reliability.py``: hostile edits to a store, a checkpoint and the inputs, each
answered through the real command line (``python -m dpocache.cli``). This module holds the case registry, the
runner and the store cases; ``reliability_cases_more.py`` adds the checkpoint, input and full-disk cases.

Each case copies what it damages from the workspace (:mod:`reliability_runs`) into its own directory, edits it,
runs one command and is judged: the exit code (not 0 where the command must fail; 0 where dpocache is meant to
recover, e.g. resuming from an older checkpoint), no ``Traceback`` in the output, and the message naming the
culprit (every fragment of ``names``: the damaged file, the option, the step). A failing ``train`` must also leave
no ``model.safetensors``. Full-disk cases run on a real small tmpfs mounted in a private mount namespace
(``tests/conftest.py: run_on_small_disk``) and are left out (counted as not run) where ``mount`` is not allowed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reliability_runs import Workspace, run_cli


@dataclass
class Case:
    group: str  # store | checkpoint | input | disk
    name: str
    expect: str  # "fail" or "ok"
    prepare: Callable  # (ws, case_dir) -> (args, names[, output_dir])


CASES: list[Case] = []


def case(group: str, name: str, expect: str = "fail"):
    def add(fn):
        CASES.append(Case(group, name, expect, fn))
        return fn
    return add


# -- helpers -----------------------------------------------------------------------------------------------
def copy_store(ws: Workspace, d: Path) -> Path:
    return Path(shutil.copytree(ws.train_store, d / "store"))


def manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def edit_manifest(store: Path, fn) -> None:
    data = manifest(store)
    fn(data)
    (store / "manifest.json").write_text(json.dumps(data))


def shard(store: Path, k: int = 0) -> Path:
    return store / manifest(store)["shards"][k]["path"]


def reseal(store: Path, k: int, fn) -> tuple[Path, str]:
    """Rewrite shard ``k`` with ``fn(table)`` and fix its manifest entry (a hostile tool: checksums verify, rows are
    wrong). Returns (shard, hash of row 1)."""
    import pyarrow.parquet as pq

    path = shard(store, k)
    table = pq.read_table(path)
    pq.write_table(fn(table), path, compression="zstd", row_group_size=64)
    _fix_entry(store, k)
    return path, table.column("hash")[1].as_py()


def _fix_entry(store: Path, k: int) -> None:
    path = shard(store, k)
    edit_manifest(store, lambda m: m["shards"][k].update(bytes=path.stat().st_size,
                                                         sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def set_value(table, column: str, row: int, value):
    import pyarrow as pa

    values = table.column(column).to_pylist()
    values[row] = value
    k = table.schema.get_field_index(column)
    return table.set_column(k, table.schema.field(k), pa.array(values, table.schema.field(k).type))


def train(ws: Workspace, d: Path, store: Path, *extra: str) -> tuple[list[str], Path]:
    out = d / "out"
    return ws.train_args(out, "--max_train_steps", "1", *extra, store=store), out


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


# -- the store -------------------------------------------------------------------------------------------
@case("store", "train: a shard truncated")
def _(ws, d):
    store = copy_store(ws, d)
    truncate(victim := shard(store))
    return (*train(ws, d, store), [victim.name])


@case("store", "train: a shard deleted")
def _(ws, d):
    store = copy_store(ws, d)
    (victim := shard(store)).unlink()
    return (*train(ws, d, store), [victim.name])


@case("store", "train: one byte of a shard flipped (checksum mismatch)")
def _(ws, d):
    store = copy_store(ws, d)
    flip(victim := shard(store, 1))
    return (*train(ws, d, store), [victim.name])


@case("store", "train: a shard replaced by junk, manifest resealed")
def _(ws, d):
    store = copy_store(ws, d)
    (victim := shard(store)).write_bytes(b"PAR1 not parquet at all " * 40)
    _fix_entry(store, 0)
    return (*train(ws, d, store), [victim.name])


@case("store", "train: torn manifest (half written)")
def _(ws, d):
    store = copy_store(ws, d)
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text[:len(text) // 2])
    return (*train(ws, d, store), ["manifest.json"])


@case("store", "train: manifest deleted")
def _(ws, d):
    store = copy_store(ws, d)
    (store / "manifest.json").unlink()
    return (*train(ws, d, store), ["manifest.json"])


@case("store", "train: a foreign JSON file as manifest")
def _(ws, d):
    store = copy_store(ws, d)
    (store / "manifest.json").write_text('{"hello": 1}')
    return (*train(ws, d, store), ["manifest.json"])


@case("store", "train: unknown store format version")
def _(ws, d):
    store = copy_store(ws, d)
    edit_manifest(store, lambda m: m.update(format_version=99))
    return (*train(ws, d, store), [str(store), "99"])


@case("store", "train: a shard path leaving the store")
def _(ws, d):
    store = copy_store(ws, d)
    edit_manifest(store, lambda m: m["shards"][0].update(path="../../etc/passwd"))
    return (*train(ws, d, store), ["../../etc/passwd"])


@case("store", "train: a shard listed twice")
def _(ws, d):
    store = copy_store(ws, d)
    edit_manifest(store, lambda m: m["shards"].append(dict(m["shards"][0])))
    return (*train(ws, d, store), [shard(store).name])


@case("store", "train: manifest row count disagrees with the shard")
def _(ws, d):
    store = copy_store(ws, d)
    edit_manifest(store, lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1))
    return (*train(ws, d, store), [shard(store).name])


@case("store", "train: example list file altered")
def _(ws, d):
    store = copy_store(ws, d)
    path = store / manifest(store)["lists"]["d"]["path"]
    hashes = json.loads(path.read_text())
    path.write_text(json.dumps([hashes[1]] + hashes[1:]))
    return (*train(ws, d, store), ["'d'"])


@case("store", "train: example list file deleted")
def _(ws, d):
    store = copy_store(ws, d)
    (path := store / manifest(store)["lists"]["d"]["path"]).unlink()
    return (*train(ws, d, store), [path.name])


@case("store", "train: row resealed with a positive log-prob sum")
def _(ws, d):
    store = copy_store(ws, d)
    path, bad = reseal(store, 1, lambda t: set_value(t, "ref_chosen_logps", 1, 0.5))
    return (*train(ws, d, store), [path.name, bad])


@case("store", "train: row resealed with a NaN log-prob sum")
def _(ws, d):
    store = copy_store(ws, d)
    path, bad = reseal(store, 1, lambda t: set_value(t, "ref_rejected_logps", 1, float("nan")))
    return (*train(ws, d, store), [path.name, bad])


@case("store", "train: row resealed with a token count that disagrees with its mask")
def _(ws, d):
    store = copy_store(ws, d)
    path, bad = reseal(store, 0, lambda t: set_value(t, "ref_chosen_tokens", 1, 999))
    return (*train(ws, d, store), [path.name, bad])


def _duplicate_with_other_values(store: Path) -> str:
    """Another writer adds one example again with different reference values (its own shard)."""
    import pyarrow.parquet as pq

    from dpocache.artifacts import ReferenceStore

    first = ReferenceStore.open(store)
    row = pq.read_table(store / first.shards[0]["path"]).slice(2, 1).to_pylist()[0]
    row["ref_chosen_logps"] -= 0.5
    row["ref_chosen_token_logps"][-1] -= 0.5
    with ReferenceStore.create_or_open(store, first.identity) as again, again.writer() as w:
        w.add(row)
    return row["hash"]


@case("store", "train: one example stored twice with different values")
def _(ws, d):
    store = copy_store(ws, d)
    return (*train(ws, d, store), [_duplicate_with_other_values(store)])


@case("store", "train: an example list the store does not have")
def _(ws, d):
    store = copy_store(ws, d)
    return (*train(ws, d, store, "--store_dataset", "nope"), ["nope"])


@case("store", "train: the store directory does not exist")
def _(ws, d):
    return (*train(ws, d, d / "nowhere"), [str(d / "nowhere")])


@case("store", "train: one example stored twice with equal values (allowed)", expect="ok")
def _(ws, d):
    import pyarrow.parquet as pq

    from dpocache.artifacts import ReferenceStore

    store = copy_store(ws, d)
    first = ReferenceStore.open(store)
    row = pq.read_table(store / first.shards[0]["path"]).slice(0, 1).to_pylist()[0]
    with ReferenceStore.create_or_open(store, first.identity) as again, again.writer() as w:
        w.add(row)
    return (*train(ws, d, store), ["saved to"])


def verify(store: Path) -> list[str]:
    return ["inspect", str(store), "--verify"]


@case("store", "inspect --verify: row resealed with a NaN sum")
def _(ws, d):
    store = copy_store(ws, d)
    path, bad = reseal(store, 1, lambda t: set_value(t, "ref_chosen_logps", 1, float("nan")))
    return verify(store), None, [path.name, bad]


@case("store", "inspect --verify: per-token values that disagree with the sum")
def _(ws, d):
    import pyarrow as pa

    def shift(table):
        values = table.column("ref_chosen_token_logps").to_pylist()
        values[1] = [v - 0.5 if v else 0.0 for v in values[1]]
        k = table.schema.get_field_index("ref_chosen_token_logps")
        return table.set_column(k, table.schema.field(k), pa.array(values, table.schema.field(k).type))

    store = copy_store(ws, d)
    path, bad = reseal(store, 0, shift)
    return verify(store), None, [path.name, bad]


@case("store", "inspect --verify: one example stored twice with different values")
def _(ws, d):
    store = copy_store(ws, d)
    return verify(store), None, [_duplicate_with_other_values(store)]


@case("store", "inspect --verify: one byte of a shard flipped")
def _(ws, d):
    store = copy_store(ws, d)
    flip(victim := shard(store, 1))
    return verify(store), None, [victim.name]


@case("store", "score: into a store whose manifest is torn (never overwritten)")
def _(ws, d):
    store = copy_store(ws, d)
    text = (store / "manifest.json").read_text()
    (store / "manifest.json").write_text(text[:len(text) // 2])
    return ws.score_args(store, "--dataset", str(ws.train_data)), None, ["manifest.json"]


@case("store", "score: into a store scored with another reference setting")
def _(ws, d):
    store = copy_store(ws, d)
    return ws.score_args(store, "--dataset", str(ws.train_data), "--max_seq_length", "64"), None, \
        [str(store), "max_seq_length"]


@case("store", "score: into a non-empty directory that is not a store")
def _(ws, d):
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("keep me")
    return ws.score_args(d / "mine"), None, [str(d / "mine")]


# -- running and judging -----------------------------------------------------------------------------------
@dataclass
class Outcome:
    case: Case
    ran: bool
    passed: bool
    why: str = ""
    code: int | None = None


def run_case(ws: Workspace, c: Case, d: Path) -> Outcome:
    """Prepare, run and judge one case (see the module docstring)."""
    prepared = c.prepare(ws, d)
    args, out, names = prepared[:3]
    disk = prepared[3] if len(prepared) > 3 else None
    log = d / "output.log"
    if disk is None:
        code = run_cli(ws, args, log, cwd=d)
        text = log.read_text(errors="replace")
    else:
        done = _on_small_disk(ws, disk, args)
        if done is None:
            return Outcome(c, False, False, "mount not allowed here")
        code, text = done.returncode, done.stdout + done.stderr
        log.write_text(text)
    problems = []
    if c.expect == "fail" and code == 0:
        problems.append("exit code 0 where the command must fail")
    if c.expect == "ok" and code != 0:
        problems.append(f"exit code {code} where dpocache should recover")
    if "Traceback" in text:
        problems.append("a traceback")
    if missing := [n for n in names if n not in text]:
        problems.append(f"the message does not name {missing}")
    if c.expect == "fail" and out is not None and (out / "model.safetensors").exists() and args[0] == "train":
        problems.append("a model was written")
    last = [line for line in text.splitlines() if "error:" in line or "warning:" in line]
    return Outcome(c, True, not problems, "; ".join(problems) + (f" (output: {last[-1][:300] if last else text[-300:]})"
                                                                 if problems else ""), code)


def _on_small_disk(ws: Workspace, disk: tuple[str, Path], args: list[str]):
    from conftest import run_on_small_disk

    size, directory = disk
    env = [f"{k}={v}" for k, v in ws.env.items() if k in ("DPOCACHE_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                             "TOKENIZERS_PARALLELISM", "TQDM_DISABLE", "PYTHONPATH",
                                                             "OMP_NUM_THREADS")]
    try:
        done = run_on_small_disk(directory, size, ["env", *env, sys.executable, "-m", "dpocache.cli", *args])
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return None
    return done if "LEFT:" in done.stdout else None  # no LEFT: the namespace itself could not be made

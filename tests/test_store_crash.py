"""Crashes and concurrency: kill -9 while writing then resume; orphan cleanup; two writers at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sigkill_when
from test_store_rows import IDENTITY, make_row, sorted_rows, write_rows

from dpocache.artifacts import ReferenceStore, inspect_store

N = 240
WRITER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_store_rows import IDENTITY, make_row
from dpocache.artifacts import ReferenceStore
store = ReferenceStore.create_or_open({path!r}, IDENTITY)
have = store.hashes()
with store.writer(rows_per_shard={per_shard}) as w:
    for i in range({start}, {stop}):
        row = make_row(i, token_logps=True)
        if row["hash"] not in have:
            w.add(row)
        if i == {pause_at}:  # stop here (mid-shard, a row buffered) until killed: it can never finish first
            open({marker!r}, "w").close()
            time.sleep(600)
            sys.exit(99)
"""


def writer_cmd(path: Path, start: int = 0, stop: int = N, per_shard: int = 2, pause_at: int = -1,
               marker: Path | None = None) -> list[str]:
    code = WRITER.format(tests=str(Path(__file__).parent), path=str(path), start=start, stop=stop,
                         per_shard=per_shard, pause_at=pause_at, marker=str(marker))
    return [sys.executable, "-c", code]


def shards_in_manifest(path: Path) -> int:
    try:
        return len(json.loads((path / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_after(path: Path, shards: int) -> None:
    """SIGKILL a writer once the manifest lists ``shards`` shards, wherever it then is; the writer pauses at row
    2 * shards + 4 (rows are written in order, two a shard, so ``shards`` are listed by then)."""
    marker = path.parent / f"paused-{shards}"
    with open(marker.with_name(marker.name + ".stderr"), "w") as err:
        proc = subprocess.Popen(writer_cmd(path, pause_at=2 * shards + 4, marker=marker), stderr=err)
    sigkill_when(proc, lambda: shards_in_manifest(path) >= shards, marker, timeout=120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("whole") / "s"
    write_rows(path, [make_row(i, token_logps=True) for i in range(N)], per_shard=7)
    return sorted_rows(path, list(make_row(0, token_logps=True)))


def test_kill9_at_several_points_then_resume(tmp_path, uninterrupted):
    path = tmp_path / "s"
    seen = []
    for shards in (1, 15, 40, 70):
        kill_after(path, shards)
        store = ReferenceStore.open(path)  # a killed writer leaves a readable store
        seen.append(store.num_rows())
        assert inspect_store(path, verify=True)["ok"]
    assert seen == sorted(seen) and 0 < seen[0] and seen[-1] < N
    done = subprocess.run(writer_cmd(path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted_rows(path, list(make_row(0, token_logps=True))) == uninterrupted
    shard_files = {p.name for p in (path / "shards").iterdir()}
    listed = {Path(s["path"]).name for s in ReferenceStore.open(path).shards}
    assert shard_files == listed  # no temporaries or unlisted shards left behind
    assert ReferenceStore.open(path).num_rows() == N  # nothing scored twice


def test_orphans_of_dead_writers_are_removed_but_not_a_live_writers(tmp_path):
    path = tmp_path / "s"
    write_rows(path, [make_row(i) for i in range(3)])
    shards = path / "shards"
    unlisted = shards / "shard-0123456789abcdef0123456789abcdef.parquet"  # crash between rename and manifest
    unlisted.write_bytes(b"PAR1")
    dead = shards / f".tmp-{'d' * 32}-shard-{'1' * 32}.parquet"  # its writer's lock file is gone
    dead.write_bytes(b"partial")
    (path / ".tmp-manifest.json-abc").write_text("{")  # a manifest replace that never happened
    live = ReferenceStore.create_or_open(path, IDENTITY)  # registers a writer and holds its lock
    live_tmp = shards / f".tmp-{live._writer_lock.id}-shard-{'2' * 32}.parquet"
    live_tmp.write_bytes(b"in flight")
    other = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path.insert(0, %r)\n"
        "from test_store_rows import IDENTITY\n"
        "from dpocache.artifacts import ReferenceStore\n"
        "ReferenceStore.create_or_open(%r, IDENTITY)\n") % (str(Path(__file__).parent), str(path))],
        capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert not unlisted.exists() and not dead.exists() and not (path / ".tmp-manifest.json-abc").exists()
    assert live_tmp.exists()  # the live writer's temporary survives another process's cleanup
    live.close()
    ReferenceStore.create_or_open(path, IDENTITY).close()
    assert not live_tmp.exists()  # once its writer is gone it is an orphan
    assert ReferenceStore.open(path).num_rows() == 3


def test_two_writers_into_one_store(tmp_path, uninterrupted):
    path = tmp_path / "s"
    halves = [(0, N // 2 + 20), (N // 2 - 20, N)]  # overlapping ranges: equal duplicates are fine
    procs = [subprocess.Popen(writer_cmd(path, a, b, per_shard=1), stderr=subprocess.PIPE) for a, b in halves]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert [r[0] for r in results] == [0, 0], results
    report = inspect_store(path, verify=True)
    assert report["ok"] and report["unique_examples"] == N
    assert sorted_rows(path, list(make_row(0, token_logps=True))) == uninterrupted

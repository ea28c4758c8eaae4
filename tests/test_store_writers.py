"""Stage one with several writers and signals: chunk claims, concurrent `score` processes sharing the work,
SIGTERM then rerun, per-token values added to an existing store. Real processes, real stores."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.artifacts import ReferenceStore, inspect_store
from dpocache.artifacts.claims import CLAIMS_DIR, Claims
from dpocache.artifacts.shards import TOKEN_COLUMNS
from dpocache.cli import main
from dpocache.data import DataConfig
from dpocache.modeling import ModelConfig
from dpocache.preemption import PREEMPTED_EXIT_CODE
from dpocache.stages.score import ScoreConfig, setup

N = 40
ARGS = ["--store_dataset", "mix", "--batch_size", "2", "--rows_per_shard", "2"]


def score_cmd(model, data, store, *extra):
    return [sys.executable, "-m", "dpocache.cli", "score", "--model_name_or_path", str(model), "--dataset",
            str(data), "--store", str(store), *ARGS, *extra]


def sorted_rows(path, columns=None):
    store = ReferenceStore.open(path)
    table, _ = store.read_rows(sorted(store.hashes()), columns)
    return table.to_pylist()


def manifest_shards(store) -> int:
    try:
        return len(json.loads((store / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("writers") / "d.jsonl", conversational_rows(N, seed=41))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data):
    """One uninterrupted writer."""
    out = tmp_path_factory.mktemp("reference") / "store"
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--store", str(out),
                 *ARGS]) == 0
    return out


def test_claims_are_exclusive_heartbeat_and_go_stale(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with Claims(tmp_path, heartbeat_s=0.05) as a, Claims(tmp_path) as b:
        assert a.claim("k1") and not b.claim("k1")  # one holder at a time, even in one process
        held = json.loads((tmp_path / CLAIMS_DIR / "k1.json").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["writer"] == a.id
        path = a.path("k1")
        os.utime(path, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5  # the heartbeat refreshed it
        a.release("k1")
        assert not path.exists() and b.claim("k1") and b.holds("k1") and not a.holds("k1")
        other = a.path("k2")
        other.write_text(json.dumps({"writer": "x", "pid": 1, "host": "elsewhere", "started": 0}))
        assert not a.claim("k2")  # another host's claim with a fresh heartbeat is live
        os.utime(other, (time.time() - 1000, time.time() - 1000))
        assert a.claim("k2") and a.holds("k2")  # its heartbeat stopped: taken over
        a.path("k3").write_text(json.dumps({"writer": "y", "pid": dead_pid(), "host": socket.gethostname()}))
        assert a.claim("k3")  # its process is gone on this host
    assert not list((tmp_path / CLAIMS_DIR).iterdir())  # every claim released on exit


def test_stale_claims_of_dead_writers_are_taken_over(tiny_model_dir, data, reference, tmp_path, capsys):
    store = tmp_path / "store"
    plan = setup(ModelConfig(model_name_or_path=str(tiny_model_dir)), DataConfig(dataset=str(data)),
                 ScoreConfig(store=str(store), store_dataset="mix", batch_size=2, rows_per_shard=2), progress=False)
    plan.store.close()
    assert len(plan.units) == N // 2
    claims = store / CLAIMS_DIR
    claims.mkdir()
    pid = dead_pid()
    for unit in plan.units[::2]:  # a writer on this host that died
        (claims / f"{unit.key}.json").write_text(json.dumps({"writer": "w", "pid": pid, "host": socket.gethostname(),
                                                              "started": 0}))
    old = claims / f"{plan.units[1].key}.json"  # a writer elsewhere whose heartbeat stopped
    old.write_text(json.dumps({"writer": "v", "pid": 1, "host": "another-host", "started": 0}))
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert main(score_cmd(tiny_model_dir, data, store)[3:]) == 0
    assert f"({N} scored, 0 reused)" in capsys.readouterr().out
    assert not list(claims.iterdir())
    assert sorted_rows(store) == sorted_rows(reference)


def test_two_concurrent_writers_share_the_work(tiny_model_dir, data, reference, tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen(score_cmd(tiny_model_dir, data, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    counts = [int(re.search(r"\((\d+) scored", out).group(1)) for out, _ in outs]
    assert sum(counts) == N and min(counts) > 0, counts  # shared, and no example scored twice
    opened = ReferenceStore.open(store)
    assert opened.num_rows() == N and len(opened.shards) == N // 2  # one shard per chunk, none duplicated
    assert sorted_rows(store) == sorted_rows(reference)  # each chunk scored once, in the same batches
    assert not list((store / CLAIMS_DIR).iterdir())


def test_sigterm_commits_the_chunk_in_flight_and_a_rerun_completes(tiny_model_dir, data, reference, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen(score_cmd(tiny_model_dir, data, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while proc.poll() is None and manifest_shards(store) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "scoring finished before the signal"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    kept = ReferenceStore.open(store).num_rows()
    assert 2 * 2 <= kept < N and kept % 2 == 0  # whole chunks only: the one in flight was finished
    message = err.strip().splitlines()[-1]
    assert message.startswith("dpocache score: preempted: SIGTERM: stage one stopped after committing the chunk")
    assert f"{kept} examples scored by this run" in message and f"{N - kept} of the {N} examples remain" in message
    assert "Re-run the same command to continue" in message
    assert inspect_store(store, verify=True)["ok"] and not list((store / CLAIMS_DIR).iterdir())
    assert ReferenceStore.open(store).get_list("mix")  # the list is recorded too
    done = subprocess.run(score_cmd(tiny_model_dir, data, store), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{kept} examples reused from the store, {N - kept} to score" in done.stdout
    assert sorted_rows(store) == sorted_rows(reference)  # bit-identical to the uninterrupted run


def test_per_token_values_are_added_to_a_store_without_them(tiny_model_dir, data, reference, tmp_path, capsys):
    store = tmp_path / "store"
    import shutil

    shutil.copytree(reference, store)
    before = {r["hash"]: r for r in sorted_rows(store)}
    assert main(score_cmd(tiny_model_dir, data, store, "--save_token_logps")[3:]) == 0
    out = capsys.readouterr().out
    assert f"{N} stored examples get per-token values" in out and f"(0 scored, {N} reused, {N} given" in out
    columns = ["ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", *TOKEN_COLUMNS]
    after = sorted_rows(store, columns)
    for row in after:
        old = before[row["hash"]]
        assert row["ref_chosen_logps"] == old["ref_chosen_logps"]  # the stored sums stay authoritative
        assert row["ref_rejected_logps"] == old["ref_rejected_logps"]
        assert sum(row["ref_chosen_token_logps"]) == pytest.approx(old["ref_chosen_logps"], abs=1e-4)
        assert len(row["ref_rejected_token_logps"]) == len(old["rejected_input_ids"])
    assert sorted_rows(store) == list(before.values())  # the default columns read as before
    fresh = tmp_path / "fresh"
    assert main(score_cmd(tiny_model_dir, data, fresh, "--save_token_logps")[3:]) == 0
    assert sorted_rows(fresh, columns) == after  # the same batches as a store scored with them from the start
    assert inspect_store(store, verify=True)["ok"]
    capsys.readouterr()
    assert main(score_cmd(tiny_model_dir, data, store, "--save_token_logps")[3:]) == 0
    assert "nothing to score" in capsys.readouterr().out


def test_bf16_per_token_values_reproduce_the_stored_sums(tiny_model_dir, tmp_path, capsys):
    """In bf16 too, the shard's own rows re-batched as they were scored give the same values, so the added
    per-token values match the stored sums to summation order."""
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(12, seed=43))
    args = ["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--store",
            str(tmp_path / "s"), "--dtype", "bfloat16", "--batch_size", "3", "--rows_per_shard", "5"]
    assert main(args) == 0
    before = {r["hash"]: r for r in sorted_rows(tmp_path / "s")}
    assert main([*args, "--save_token_logps"]) == 0
    assert "(0 scored, 12 reused, 12 given per-token values)" in capsys.readouterr().out
    rows = sorted_rows(tmp_path / "s", ["ref_chosen_logps", "ref_rejected_logps", *TOKEN_COLUMNS])
    assert len(rows) == 12
    for row in rows:
        for side in ("chosen", "rejected"):
            stored = before[row["hash"]][f"ref_{side}_logps"]
            assert row[f"ref_{side}_logps"] == stored
            assert abs(sum(row[f"ref_{side}_token_logps"]) - stored) < 1e-6

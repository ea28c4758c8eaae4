"""Stage one under failure: kill -9 or preemption while scoring, rerun, same store; incremental scoring; parallel
parts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main
from dpocache.preemption import PREEMPTED_EXIT_CODE


def score_cmd(model, data, store, *extra):
    return [sys.executable, "-m", "dpocache.cli", "score", "--model_name_or_path", str(model), "--dataset",
            str(data), "--store", str(store), "--store_dataset", "mix", "--batch_size", "2", *extra]


def sorted_rows(path):
    store = ReferenceStore.open(path)
    table, _ = store.read_rows(sorted(store.hashes()))
    return table.to_pylist()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    return write_jsonl(root / "a.jsonl", conversational_rows(120, seed=11)), \
        write_jsonl(root / "b.jsonl", conversational_rows(30, seed=12))


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_model_dir, data):
    out = tmp_path_factory.mktemp("ref") / "store"
    cmd = score_cmd(tiny_model_dir, data[0], out, "--rows_per_shard", "2")
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    return out


@pytest.mark.parametrize("kill_after_shards", [1, 5])
def test_kill9_then_rerun_equals_uninterrupted(tiny_model_dir, data, reference_store, tmp_path, kill_after_shards):
    store = tmp_path / "store"
    proc = subprocess.Popen(score_cmd(tiny_model_dir, data[0], store, "--rows_per_shard", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((store / "manifest.json").read_text())["shards"]) >= kill_after_shards:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "scoring finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = ReferenceStore.open(store).num_rows()
    assert 0 < partial < 120
    done = subprocess.run(score_cmd(tiny_model_dir, data[0], store, "--rows_per_shard", "2"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{partial} examples reused" in done.stdout + done.stderr
    assert sorted_rows(store) == sorted_rows(reference_store)
    assert not [p for p in (store / "shards").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_stops_after_a_chunk_then_rerun_completes(tiny_model_dir, data, reference_store, tmp_path, sig):
    """SIGTERM/SIGUSR1 while scoring: the chunk in flight is committed, the command exits 75 with one line saying
    what was kept; the same command run again scores only the rest and ends with the uninterrupted store."""
    store = tmp_path / "store"
    proc = subprocess.Popen(score_cmd(tiny_model_dir, data[0], store, "--rows_per_shard", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((store / "manifest.json").read_text())["shards"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "scoring finished before the signal"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    name = signal.Signals(sig).name
    assert f"dpocache score: preempted: {name} after " in err and "Traceback" not in err
    partial = ReferenceStore.open(store).num_rows()
    assert 0 < partial < 120 and f"{partial} newly scored example(s) are in {store}" in out
    assert not [p for p in (store / "shards").iterdir() if p.name.startswith(".tmp-")]
    done = subprocess.run(score_cmd(tiny_model_dir, data[0], store, "--rows_per_shard", "2"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{partial} examples reused" in done.stdout
    assert sorted_rows(store) == sorted_rows(reference_store)


def test_incremental_scores_only_new_examples(tiny_model_dir, data, reference_store, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(reference_store, store)
    before = {r["hash"]: r for r in sorted_rows(store)}
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--mixer_list", str(data[0]), "1.0",
                 str(data[1]), "1.0", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "120 examples reused from the store, 30 to score" in out
    after = {r["hash"]: r for r in sorted_rows(store)}
    assert len(after) == 150 and all(after[h] == row for h, row in before.items())


def test_two_parts_then_merge_equals_single(tiny_model_dir, data, reference_store, tmp_path):
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}"
        assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data[0]), "--store",
                     str(part), "--store_dataset", "mix", "--num_shards", "2", "--shard_index", str(i),
                     "--batch_size", "2", "--rows_per_shard", "2"]) == 0
        parts.append(part)
    sizes = [ReferenceStore.open(p).num_rows() for p in parts]
    assert sum(sizes) == 120 and min(sizes) > 0
    assert main(["store", "merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    assert sorted_rows(tmp_path / "merged") == sorted_rows(reference_store)
    merged = ReferenceStore.open(tmp_path / "merged")
    assert merged.get_list("mix") == ReferenceStore.open(reference_store).get_list("mix")


def test_inspect_reports_coverage_and_verifies(tiny_model_dir, data, reference_store, capsys):
    assert main(["inspect", str(reference_store), "--verify", "--dataset", str(data[1]),
                 "--tokenizer_name_or_path", str(tiny_model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rows"] == 120 and report["lists"]["mix"]["count"] == 120
    assert report["coverage"] == {"examples": 30, "present": 0, "missing": 30}
    assert main(["inspect", str(reference_store), "--dataset", str(data[0]),
                 "--tokenizer_name_or_path", str(tiny_model_dir)]) == 0
    assert "coverage: 120/120 present, 0 missing" in capsys.readouterr().out

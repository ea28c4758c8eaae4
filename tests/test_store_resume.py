"""Stage one under failure: kill -9 or preemption while scoring, rerun, same store; incremental scoring; parallel
parts."""

import json
import math
import subprocess
import sys

import pytest
from conftest import conversational_rows, on_gpu, sigkill_when, start_pausing_cli, write_jsonl

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main


def score_args(model, data, store, *extra):
    return ["score", "--model_name_or_path", str(model), "--dataset", str(data), "--store", str(store),
            "--store_dataset", "mix", "--batch_size", "2", *extra]


def score_cmd(model, data, store, *extra):
    return [sys.executable, "-m", "dpocache.cli", *score_args(model, data, store, *extra)]


def shards_listed(store) -> int:
    try:
        return len(json.loads((store / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows; on a GPU the reference values of examples batched differently may differ in the last bits."""
    if not on_gpu():
        assert a == b
        return
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            vb = rb[key]
            if isinstance(va, float):
                assert math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-4), (key, va, vb)
            elif isinstance(va, list) and va and isinstance(va[0], float):
                assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-4) for x, y in zip(va, vb)), key
            else:
                assert va == vb, key


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


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [1, 5])
def test_kill9_then_rerun_equals_uninterrupted(tiny_model_dir, data, reference_store, tmp_path, kill_after_shards):
    """SIGKILL once the manifest lists ``kill_after_shards`` shards, wherever scoring is then. The scorer pauses a
    little later (after the manifest's creation and kill_after_shards + 2 shard commits), so it can never finish
    first."""
    store, marker = tmp_path / "store", tmp_path / "paused"
    proc = start_pausing_cli(score_args(tiny_model_dir, data[0], store, "--rows_per_shard", "2"), marker,
                             target="manifest.json", times=kill_after_shards + 3)
    sigkill_when(proc, lambda: shards_listed(store) >= kill_after_shards, marker)
    partial = ReferenceStore.open(store).num_rows()
    assert 2 * kill_after_shards <= partial <= 2 * (kill_after_shards + 3)
    done = subprocess.run(score_cmd(tiny_model_dir, data[0], store, "--rows_per_shard", "2"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{partial} examples reused" in done.stdout + done.stderr
    assert_same_rows(sorted_rows(store), sorted_rows(reference_store))
    assert not [p for p in (store / "shards").iterdir() if p.name.startswith(".tmp-")]


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


@pytest.mark.slow
def test_two_parts_then_merge_equals_single(tiny_model_dir, data, reference_store, tmp_path):
    parts = []
    for i in range(2):
        part = tmp_path / f"part{i}"
        assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data[0]), "--store",
                     str(part), "--store_dataset", "mix", "--num_shards", "2", "--shard_index", str(i),
                     "--batch_size", "2", "--rows_per_shard", "2"]) == 0
        parts.append(part)
    sizes = [ReferenceStore.open(p).num_rows() for p in parts]
    assert sizes == [60, 60]  # split by example: equal halves
    assert not ReferenceStore.open(parts[0]).hashes() & ReferenceStore.open(parts[1]).hashes()
    assert main(["store", "merge", str(tmp_path / "merged"), *map(str, parts)]) == 0
    merged, single = sorted_rows(tmp_path / "merged"), sorted_rows(reference_store)
    assert [r["hash"] for r in merged] == [r["hash"] for r in single]
    for a, b in zip(merged, single):  # a part's chunks batch other examples together: values agree to rounding
        for key, value in b.items():
            assert a[key] == (pytest.approx(value, rel=1e-6, abs=1e-6) if key.endswith("_logps") else value), key
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

"""`inspect --verify` sees what training sees: every hostile store that stage two refuses fails verification
too, naming the shard, the row and the example; clean stores pass both."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import conversational_rows, score_rows

from dpocache.artifacts import ReferenceStore, StoreError
from dpocache.artifacts.shards import ALL_COLUMNS
from dpocache.artifacts.validate import Duplicates, check_rows
from dpocache.cli import main


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    """A real store: 12 pairs scored by the tiny model, 4 rows per shard, per-token values kept."""
    root = tmp_path_factory.mktemp("verify")
    return score_rows(root, tiny_model_dir, conversational_rows(12, seed=21), "--rows_per_shard", "4",
                      "--save_token_logps", "true")


@pytest.fixture
def store(scored, tmp_path):
    return shutil.copytree(scored, tmp_path / "store")


def reseal(root, k: int, fn) -> tuple:
    """Rewrite shard ``k`` with ``fn(table)`` and update its manifest entry (bytes, sha256) to match, as a hostile
    or buggy tool would: checksums verify, only the rows are wrong. Returns (shard path, first row's hash)."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["shards"][k]
    path = root / entry["path"]
    table = pq.read_table(path)
    pq.write_table(fn(table), path, compression="zstd", row_group_size=64)
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))
    return path, table.column("hash")[1].as_py()


def set_value(table: pa.Table, column: str, row: int, value) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    k = table.schema.get_field_index(column)
    return table.set_column(k, table.schema.field(k), pa.array(values, table.schema.field(k).type))


def train_args(model, store, out):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.1", "--max_train_steps", "1", "--per_device_train_batch_size", "4"]


def refused_by_verify(store, capsys, *fragments: str) -> None:
    """inspect --verify exits 1 naming the defect (text and JSON)."""
    assert main(["inspect", str(store), "--verify"]) == 1
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM: ")]
    assert problems and all(f in problems[0] for f in fragments), out
    report_args = ["inspect", str(store), "--verify", "--json"]
    assert main(report_args) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["bad_rows"] >= 1 and report["defects"][0]["hash"] in problems[0]


def refused_by_train(store, model, tmp_path, capsys, *fragments: str) -> None:
    """train exits 2 with one line naming the store's defect (its shard and example), and saves nothing."""
    assert main(train_args(model, store, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and all(f in err for f in fragments), err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("column, value, message", [
    ("ref_chosen_logps", 0.5, "ref_chosen_logps = 0.5 > 0 is not a log-probability sum"),
    ("ref_rejected_logps", float("nan"), "ref_rejected_logps is not a finite number (nan)"),
    ("ref_chosen_tokens", 999, "ref_chosen_tokens 999 != trainable tokens in mask"),
])
def test_resealed_rows_are_refused_by_verify_and_by_training(store, tiny_model_dir, tmp_path, capsys,
                                                              column, value, message):
    assert main(["inspect", str(store), "--verify"]) == 0  # clean before
    capsys.readouterr()
    path, bad_hash = reseal(store, 1, lambda t: set_value(t, column, 1, value))
    refused_by_verify(store, capsys, f"{path}: row 1 (example {bad_hash})", message)
    refused_by_train(store, tiny_model_dir, tmp_path, capsys, str(path), "row 1", bad_hash)


def test_per_token_values_that_disagree_with_the_sum_are_refused(store, capsys):
    """Training reads sums and counts only; verify and any reader of the per-token columns refuse the row."""
    def shift(table):
        values = table.column("ref_chosen_token_logps").to_pylist()
        values[1] = [v - 0.5 if v else 0.0 for v in values[1]]
        k = table.schema.get_field_index("ref_chosen_token_logps")
        return table.set_column(k, table.schema.field(k), pa.array(values, table.schema.field(k).type))

    path, bad_hash = reseal(store, 0, shift)
    where = f"{path}: row 1 (example {bad_hash})"
    refused_by_verify(store, capsys, where, "ref_chosen_token_logps sums to")
    reader = ReferenceStore.open(store)
    with pytest.raises(StoreError, match=re.escape(where) + ": ref_chosen_token_logps sums to"):
        reader.read_rows(reader.get_list("prefs"), ALL_COLUMNS)


def test_one_example_with_different_values_in_two_shards_is_refused(store, tiny_model_dir, tmp_path, capsys):
    first = ReferenceStore.open(store)
    shard0 = store / first.shards[0]["path"]
    row = pq.read_table(shard0).slice(2, 1).to_pylist()[0]
    row["ref_chosen_logps"] -= 0.5  # still a valid row on its own
    row["ref_chosen_token_logps"][-1] -= 0.5
    with ReferenceStore.create_or_open(store, first.identity) as writer_store, writer_store.writer() as w:
        w.add(row)  # another writer, another shard: the store keeps both rows
    second = store / ReferenceStore.open(store).shards[-1]["path"]
    refused_by_verify(store, capsys, f"{second}: row 0 (example {row['hash']})",
                      f"different reference values than in {shard0} row 2", "ref_chosen_logps")
    rel = [str(p.relative_to(store)) for p in (shard0, second)]
    refused_by_train(store, tiny_model_dir, tmp_path, capsys, row["hash"], "different reference values", *rel)


def test_equal_duplicates_pass_both(store, tiny_model_dir, tmp_path, capsys):
    first = ReferenceStore.open(store)
    row = pq.read_table(store / first.shards[0]["path"]).slice(0, 1).to_pylist()[0]
    with ReferenceStore.create_or_open(store, first.identity) as writer_store, writer_store.writer() as w:
        w.add(row)
    assert main(["inspect", str(store), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["duplicate_rows"] == 1 and report["bad_rows"] == 0
    assert main(train_args(tiny_model_dir, store, tmp_path / "out")) == 0


def test_check_rows_names_every_defect_of_a_batch():
    """The function itself, on a batch holding several defects (what inspect reports row by row)."""
    good = {"hash": "a" * 64, "chosen_input_ids": [5, 6, 7], "chosen_mask": [0, 1, 1], "rejected_input_ids": [5, 8],
            "rejected_mask": [0, 1], "ref_chosen_logps": -2.0, "ref_rejected_logps": -1.0, "ref_chosen_tokens": 2,
            "ref_rejected_tokens": 1}
    rows = [good, dict(good, hash="b" * 64, chosen_mask=[1, 1, 1], ref_chosen_tokens=3),
            dict(good, hash="c" * 64, rejected_mask=[0, 1, 1]), dict(good, hash="NOTHEX")]
    table = pa.Table.from_pylist(rows)
    defects = check_rows(table, shard="s.parquet", first_row=10)
    found = [(d.row, d.hash[:6], d.problem.split(" ")[0]) for d in defects]
    assert found == [(11, "bbbbbb", "chosen_mask[0]"), (12, "cccccc", "rejected"),
                     (12, "cccccc", "ref_rejected_tokens"), (13, "NOTHEX", "hash")]
    assert str(defects[0]).startswith(f"s.parquet: row 11 (example {'b' * 64}): chosen_mask[0] is 1")
    seen = Duplicates()
    assert check_rows(pa.Table.from_pylist([good]), shard="x", duplicates=seen) == []
    again = check_rows(pa.Table.from_pylist([dict(good, ref_rejected_logps=-1.5)]), shard="y", first_row=3,
                       duplicates=seen)
    assert [str(d) for d in again] == [f"y: row 3 (example {'a' * 64}): different reference values than in x row 0 "
                                       "(ref_rejected_logps -1.0 vs -1.5): the store mixes incompatible computations"]

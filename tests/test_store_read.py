"""Reading a store: order, projection, missing examples, duplicates, lists, relocation, incremental writes."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from test_store_rows import IDENTITY, make_row, row_hash, sorted_rows, write_rows

from dpocache.artifacts import ReferenceStore, StoreError


def test_rows_come_back_in_the_requested_order_with_repeats(tmp_path):
    rows = [make_row(i) for i in range(10)]
    store = write_rows(tmp_path / "s", rows)
    assert len(store.shards) == 4 and store.num_rows() == 10
    order = [7, 0, 7, 9, 3]
    table, missing = ReferenceStore.open(tmp_path / "s").read_rows([rows[i]["hash"] for i in order])
    assert missing == 0
    assert table.to_pylist() == [rows[i] for i in order]


def test_projection_reads_only_the_requested_columns(tmp_path):
    rows = [make_row(i, token_logps=True) for i in range(5)]
    write_rows(tmp_path / "s", rows)
    store = ReferenceStore.open(tmp_path / "s")
    table, _ = store.read_rows([rows[2]["hash"]], ["ref_chosen_logps"])
    assert table.column_names == ["hash", "ref_chosen_logps"]
    assert table.column("ref_chosen_logps").to_pylist() == [rows[2]["ref_chosen_logps"]]
    default, _ = store.read_rows([rows[2]["hash"]])
    assert "ref_chosen_token_logps" not in default.column_names  # per-token columns only when asked
    tok, _ = store.read_rows([rows[2]["hash"]], ["ref_rejected_token_logps"])
    assert tok.column("ref_rejected_token_logps").to_pylist()[0] == pytest.approx(rows[2]["ref_rejected_token_logps"])
    with pytest.raises(StoreError, match="unknown column"):
        store.read_rows([rows[2]["hash"]], ["logits"])


def test_per_token_columns_missing_from_a_shard(tmp_path):
    write_rows(tmp_path / "s", [make_row(0)])
    store = ReferenceStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="shard has no column.*ref_chosen_token_logps"):
        store.read_rows([row_hash(0)], ["ref_chosen_token_logps"])


def test_missing_examples_are_counted_and_named(tmp_path):
    rows = [make_row(i) for i in range(4)]
    store = write_rows(tmp_path / "s", rows)
    wanted = [rows[0]["hash"], row_hash(100), rows[1]["hash"], row_hash(101)]
    with pytest.raises(StoreError) as err:
        store.read_rows(wanted)
    assert "2 of 4 requested examples are missing" in str(err.value) and row_hash(100) in str(err.value)
    table, missing = store.read_rows(wanted, allow_missing=True)
    assert missing == 2 and table.column("hash").to_pylist() == [rows[0]["hash"], rows[1]["hash"]]
    empty, missing = store.read_rows([row_hash(100)], ["ref_chosen_logps"], allow_missing=True)
    assert missing == 1 and empty.num_rows == 0 and empty.column_names == ["hash", "ref_chosen_logps"]


def test_reads_span_row_groups_and_shards(tmp_path):
    rows = [make_row(i) for i in range(300)]
    write_rows(tmp_path / "s", rows, per_shard=200)  # two shards of several row groups each
    store = ReferenceStore.open(tmp_path / "s")
    shard = tmp_path / "s" / store.shards[0]["path"]
    assert pq.ParquetFile(shard).num_row_groups > 1
    order = [299, 0, 64, 63, 128, 199, 200, 5]
    table, _ = store.read_rows([rows[i]["hash"] for i in order], ["ref_rejected_logps"])
    assert table.column("ref_rejected_logps").to_pylist() == [rows[i]["ref_rejected_logps"] for i in order]


def test_same_hash_in_two_shards(tmp_path):
    store = write_rows(tmp_path / "s", [make_row(0)])
    with store.writer() as w:
        w.add(make_row(0))  # equal values in a second shard: fine
    assert ReferenceStore.open(tmp_path / "s").read_rows([row_hash(0)])[0].num_rows == 1
    with store.writer() as w:
        w.add(make_row(0, shift=0.5))
    shards = [s["path"] for s in ReferenceStore.open(tmp_path / "s").shards]
    with pytest.raises(StoreError) as err:
        ReferenceStore.open(tmp_path / "s").read_rows([row_hash(0)])
    assert "different reference values" in str(err.value)
    assert shards[0] in str(err.value) and shards[2] in str(err.value)


def test_incremental_writes_add_only_what_is_missing(tmp_path):
    write_rows(tmp_path / "s", [make_row(i) for i in range(5)])
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    have = store.hashes()
    assert have == {row_hash(i) for i in range(5)}
    with store.writer(rows_per_shard=4) as w:
        w.add_many(make_row(i) for i in range(8) if row_hash(i) not in have)
    assert store.num_rows() == 8 and len(store.hashes()) == 8
    assert sorted_rows(tmp_path / "s") == sorted((make_row(i) for i in range(8)), key=lambda r: r["hash"])


def test_writer_flushes_the_partial_buffer_on_error(tmp_path):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    with pytest.raises(RuntimeError):
        with store.writer(rows_per_shard=100) as w:
            w.add_many(make_row(i) for i in range(3))
            raise RuntimeError("scoring failed")
    assert ReferenceStore.open(tmp_path / "s").hashes() == {row_hash(i) for i in range(3)}


def test_named_lists(tmp_path):
    store = write_rows(tmp_path / "s", [make_row(i) for i in range(4)])
    order = [row_hash(i) for i in (3, 1, 1, 0)]
    store.record_list("tulu-3.mix_v1", order)
    assert store.lists() == {"tulu-3.mix_v1": 4}
    reader = ReferenceStore.open(tmp_path / "s")
    assert reader.get_list("tulu-3.mix_v1") == order
    store.record_list("tulu-3.mix_v1", order[:2])  # replaced, old file removed
    assert ReferenceStore.open(tmp_path / "s").get_list("tulu-3.mix_v1") == order[:2]
    assert len(list((tmp_path / "s" / "lists").iterdir())) == 1
    for bad in ("../evil", ".hidden", "a/b", "", "x" * 201):
        with pytest.raises(StoreError, match="is not allowed"):
            store.record_list(bad, order)
    with pytest.raises(StoreError, match="entry 1 .* is not an example hash"):
        store.record_list("ok", [order[0], "zz"])
    with pytest.raises(StoreError, match="no example list named 'nope' \\(lists: tulu-3.mix_v1\\)"):
        reader.get_list("nope")


def test_read_only_store_refuses_writes(tmp_path):
    write_rows(tmp_path / "s", [make_row(0)])
    reader = ReferenceStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="opened read-only"):
        reader.writer()
    with pytest.raises(StoreError, match="opened read-only"):
        reader.record_list("x", [row_hash(0)])


def test_a_copied_store_works_elsewhere(tmp_path):
    rows = [make_row(i) for i in range(4)]
    write_rows(tmp_path / "s", rows).record_list("x", [r["hash"] for r in rows])
    shutil.copytree(tmp_path / "s", tmp_path / "other" / "copy")
    shutil.rmtree(tmp_path / "s")
    store = ReferenceStore.open(tmp_path / "other" / "copy")
    assert store.read_rows(store.get_list("x"))[0].to_pylist() == rows
    assert str(tmp_path) not in (tmp_path / "other" / "copy" / "manifest.json").read_text()

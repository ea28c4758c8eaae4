"""Parallel parts merged into one store equal a single run; identities and values are checked."""

from __future__ import annotations

import pytest
from test_store_rows import IDENTITY, make_row, row_hash, sorted_rows, write_rows

from dpocache.artifacts import IdentityMismatchError, ReferenceStore, StoreError, inspect_store, merge_stores

COLUMNS = list(make_row(0, token_logps=True))


def test_two_parts_merged_equal_a_single_run(tmp_path):
    rows = [make_row(i, token_logps=True) for i in range(40)]
    order = [r["hash"] for r in rows]
    write_rows(tmp_path / "single", rows).record_list("mix", order)
    parts = [rows[i::2] for i in range(2)]  # disjoint parts, each recording the full list
    for k, part in enumerate(parts):
        write_rows(tmp_path / f"part{k}", part, per_shard=5).record_list("mix", order)
    result = merge_stores(tmp_path / "merged", [tmp_path / "part0", tmp_path / "part1"])
    assert result["rows_copied"] == 40 and result["rows"] == 40 and result["lists"] == {"mix": 40}
    assert sorted_rows(tmp_path / "merged", COLUMNS) == sorted_rows(tmp_path / "single", COLUMNS)
    merged = ReferenceStore.open(tmp_path / "merged")
    assert merged.get_list("mix") == order and merged.identity == IDENTITY
    assert inspect_store(tmp_path / "merged", verify=True)["ok"]
    again = merge_stores(tmp_path / "merged", [tmp_path / "part0", tmp_path / "part1"])  # idempotent
    assert again["rows_copied"] == 0 and again["rows"] == 40 and merged.get_list("mix") == order


def test_overlapping_parts_and_differing_lists(tmp_path):
    rows = [make_row(i) for i in range(10)]
    write_rows(tmp_path / "a", rows[:6]).record_list("mix", [r["hash"] for r in rows[:6]])
    write_rows(tmp_path / "b", rows[4:]).record_list("mix", [r["hash"] for r in rows[4:]])
    result = merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    assert result["rows_copied"] == 10 and result["examples"] == 10
    merged = ReferenceStore.open(tmp_path / "m")
    # lists that differ are concatenated in the order of the sources (repeats kept)
    assert merged.get_list("mix") == [r["hash"] for r in rows[:6]] + [r["hash"] for r in rows[4:]]
    assert sorted_rows(tmp_path / "m") == sorted(rows, key=lambda r: r["hash"])


def test_merge_refuses_other_identities_and_conflicting_values(tmp_path):
    write_rows(tmp_path / "a", [make_row(0), make_row(1)])
    write_rows(tmp_path / "c", [make_row(2)], identity=dict(IDENTITY, dtype="bfloat16"))
    with pytest.raises(IdentityMismatchError, match="dtype: store has 'float32', requested 'bfloat16'"):
        merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "c"])
    assert not (tmp_path / "m").exists()
    write_rows(tmp_path / "b", [make_row(1, shift=0.25)])
    with pytest.raises(StoreError, match=f"example {row_hash(1)} has different reference values"):
        merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(StoreError, match="cannot also be the destination"):
        merge_stores(tmp_path / "a", [tmp_path / "a"])
    with pytest.raises(StoreError, match="at least one source"):
        merge_stores(tmp_path / "m", [])


def test_merge_detects_a_corrupt_source(tmp_path):
    store = write_rows(tmp_path / "a", [make_row(i) for i in range(4)])
    shard = tmp_path / "a" / store.shards[0]["path"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        merge_stores(tmp_path / "m", [tmp_path / "a"])

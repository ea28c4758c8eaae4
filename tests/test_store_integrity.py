"""Damage and hostile input: each defect is detected with its own message naming the file."""

from __future__ import annotations

import json
import os

import pytest
from test_store_rows import IDENTITY, make_row, row_hash, write_rows

from dpocache.artifacts import IdentityMismatchError, ReferenceStore, StoreError, format_inspect, inspect_store

HASHES = [row_hash(i) for i in range(6)]


@pytest.fixture
def store_dir(tmp_path):
    write_rows(tmp_path / "s", [make_row(i) for i in range(6)]).record_list("all", HASHES)
    return tmp_path / "s"


def first_shard(root):
    return root / json.loads((root / "manifest.json").read_text())["shards"][0]["path"]


def edit_manifest(root, fn):
    data = json.loads((root / "manifest.json").read_text())
    fn(data)
    (root / "manifest.json").write_text(json.dumps(data))


def test_flipped_byte_is_a_checksum_mismatch(store_dir):
    shard = first_shard(store_dir)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError) as err:
        ReferenceStore.open(store_dir).read_rows(HASHES)
    assert f"{shard}: shard checksum mismatch" in str(err.value)
    report = inspect_store(store_dir, verify=True)
    assert not report["ok"] and len(report["problems"]) == 1 and "checksum mismatch" in report["problems"][0]
    assert [s["ok"] for s in report["shards"]] == [False, True]
    assert "PROBLEM:" in format_inspect(report) and "PROBLEMS FOUND" in format_inspect(report)


def test_truncated_shard(store_dir):
    shard = first_shard(store_dir)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match="shard is truncated or altered"):
        ReferenceStore.open(store_dir, verify=False).read_rows(HASHES)
    assert "truncated" in inspect_store(store_dir)["problems"][0]


def test_shard_deleted(store_dir):
    first_shard(store_dir).unlink()
    with pytest.raises(StoreError, match="shard listed in the manifest is missing"):
        ReferenceStore.open(store_dir).hashes()


def test_torn_manifest(store_dir):
    text = (store_dir / "manifest.json").read_text()
    (store_dir / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match=r"manifest.json: torn or corrupt manifest \(not valid JSON"):
        ReferenceStore.open(store_dir)
    with pytest.raises(StoreError, match="torn or corrupt manifest"):  # never silently overwritten
        ReferenceStore.create_or_open(store_dir, IDENTITY)


def test_missing_manifest_and_missing_directory(store_dir, tmp_path):
    (store_dir / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json: no manifest"):
        ReferenceStore.open(store_dir)
    with pytest.raises(StoreError, match="no such store directory"):
        ReferenceStore.open(tmp_path / "nowhere")


def test_unsupported_format_version_and_foreign_json(store_dir):
    edit_manifest(store_dir, lambda d: d.update(format_version=99))
    with pytest.raises(StoreError, match="store format version 99 is not supported"):
        ReferenceStore.open(store_dir)
    (store_dir / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(StoreError, match="not a dpocache store manifest"):
        ReferenceStore.open(store_dir)


def test_stale_identity_lists_each_differing_field(store_dir):
    other = dict(IDENTITY, dtype="bfloat16", max_seq_length=128, backend=None)
    other.pop("mask_mode")
    with pytest.raises(IdentityMismatchError) as err:
        ReferenceStore.create_or_open(store_dir, other)
    text = str(err.value)
    assert "4 differing field(s)" in text
    assert "dtype: store has 'float32', requested 'bfloat16'" in text
    assert "max_seq_length: store has 64, requested 128" in text
    assert "mask_mode: store has 'all_assistant', requested (absent)" in text
    assert "backend: store has 'hf', requested None" in text
    assert ReferenceStore.open(store_dir).num_rows() == 6  # nothing touched


def test_identity_must_be_flat(tmp_path):
    with pytest.raises(StoreError, match="identity field 'model' must be a string, number, boolean or null"):
        ReferenceStore.create_or_open(tmp_path / "s", {"model": {"name": "x"}})


@pytest.mark.parametrize("path, message", [
    ("../../etc/passwd", "points outside the store"),
    ("/etc/passwd", "points outside the store"),
    ("shards/../../x.parquet", "points outside the store"),
    (7, "is not a relative path string"),
])
def test_manifest_paths_cannot_leave_the_store(store_dir, path, message):
    edit_manifest(store_dir, lambda d: d["shards"][0].update(path=path))
    with pytest.raises(StoreError, match=message):
        ReferenceStore.open(store_dir)


def test_symlink_escaping_the_store(store_dir, tmp_path):
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(first_shard(store_dir).read_bytes())
    os.symlink(outside, store_dir / "shards" / "link.parquet")
    edit_manifest(store_dir, lambda d: d["shards"][0].update(path="shards/link.parquet"))
    with pytest.raises(StoreError, match="resolves outside the store"):
        ReferenceStore.open(store_dir)


def test_malformed_entries(store_dir):
    edit_manifest(store_dir, lambda d: d["shards"][0].update(rows=-1))
    with pytest.raises(StoreError, match="has an invalid rows"):
        ReferenceStore.open(store_dir)
    edit_manifest(store_dir, lambda d: d["shards"][0].update(rows=3))
    edit_manifest(store_dir, lambda d: d["shards"].append(dict(d["shards"][1])))
    with pytest.raises(StoreError, match="is listed twice"):
        ReferenceStore.open(store_dir)


def test_row_count_disagreeing_with_the_footer(store_dir):
    edit_manifest(store_dir, lambda d: d["shards"][0].update(rows=4))
    with pytest.raises(StoreError, match="shard has 3 rows, manifest says 4"):
        ReferenceStore.open(store_dir).hashes()


def test_corrupt_list_file(store_dir):
    entry = json.loads((store_dir / "manifest.json").read_text())["lists"]["all"]
    path = store_dir / entry["path"]
    path.write_text(path.read_text().replace(HASHES[0], HASHES[1]))
    with pytest.raises(StoreError, match="example list 'all' checksum mismatch"):
        ReferenceStore.open(store_dir).get_list("all")
    report = inspect_store(store_dir, verify=True)
    assert not report["ok"] and report["lists"]["all"]["ok"] is False


def test_a_foreign_directory_is_not_turned_into_a_store(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="directory is not empty and is not a dpocache store"):
        ReferenceStore.create_or_open(tmp_path / "home", IDENTITY)
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == [".lock", "notes.txt"]


def test_inspect_reports_content(store_dir):
    report = inspect_store(store_dir, verify=True, dataset_hashes=HASHES[:4] + [row_hash(50)])
    assert report["ok"] and report["rows"] == 6 and report["unique_examples"] == 6
    assert report["coverage"] == {"examples": 5, "present": 4, "missing": 1}
    assert report["lists"]["all"]["count"] == 6 and report["duplicate_rows"] == 0
    rows = [make_row(i) for i in range(6)]
    stats = report["statistics"]
    assert stats["ref_chosen_logps"]["min"] == min(r["ref_chosen_logps"] for r in rows)
    assert stats["chosen_length"]["max"] == max(len(r["chosen_input_ids"]) for r in rows)
    assert stats["rejected_trainable_tokens"]["mean"] == pytest.approx(
        sum(r["ref_rejected_tokens"] for r in rows) / 6)
    text = format_inspect(report)
    assert "coverage: 4/5 present, 1 missing" in text and "all: 6 examples" in text
    json.dumps(report)  # the CLI prints it as JSON


def test_non_finite_reference_values_stop_stage_two_even_unverified(store_dir):
    """A shard rewritten with a NaN reference sum (manifest edited to match its size) passes an unverified open;
    loading the examples for training still refuses it, naming the shard, row and example."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpocache.stages.train.store_index import build_index

    shard = first_shard(store_dir)
    table = pq.read_table(shard)
    values = table.column("ref_chosen_logps").to_numpy().copy()
    values[0] = float("nan")
    k = table.schema.get_field_index("ref_chosen_logps")
    pq.write_table(table.set_column(k, table.schema.field(k), pa.array(values)), shard)
    edit_manifest(store_dir, lambda m: m["shards"][0].update(bytes=shard.stat().st_size))
    first = table.column("hash")[0].as_py()
    store = ReferenceStore.open(store_dir, verify=False)
    with pytest.raises(StoreError, match=re.escape(f"{shard}: row 0 (example {first}): ref_chosen_logps is not a "
                                                   "finite number (nan)")):
        build_index(store, HASHES, allow_missing=False, verify=False)
    with pytest.raises(StoreError, match="checksum mismatch"):
        build_index(ReferenceStore.open(store_dir), HASHES, allow_missing=False, verify=True)

"""The reference store: round trips, identity, corruption detection, concurrency, merge, fingerprints."""

import json
import subprocess
import sys

import pytest

from dpocache.artifacts import IdentityMismatchError, ReferenceStore, StoreError, inspect_store, merge_stores
from dpocache.artifacts.identity import tokenizer_fingerprint, weights_fingerprint
from dpocache.data import example_hash

IDENTITY = {"model_weights_sha256": "abc", "max_seq_length": 64, "dtype": "float32", "backend": "hf"}


def make_row(i: int, lp: float | None = None) -> dict:
    c_ids, r_ids = [1, 2, 3 + i, 7], [1, 2, 4 + i]
    c_mask, r_mask = [0, 0, 1, 1], [0, 1, 1]
    return {"hash": example_hash(c_ids, c_mask, r_ids, r_mask), "chosen_input_ids": c_ids, "chosen_mask": c_mask,
            "rejected_input_ids": r_ids, "rejected_mask": r_mask,
            "ref_chosen_logps": -1.5 - i if lp is None else lp, "ref_rejected_logps": -2.25 - i,
            "ref_chosen_tokens": 2, "ref_rejected_tokens": 2}


def write(path, rows, per_shard=3):
    store = ReferenceStore.create_or_open(path, IDENTITY)
    with store.writer(rows_per_shard=per_shard) as w:
        w.add_many(rows)
    return store


def test_round_trip_order_projection_and_missing(tmp_path):
    rows = [make_row(i) for i in range(10)]
    store = write(tmp_path / "s", rows)
    assert len(store.shards) == 4 and store.num_rows() == 10
    want = [rows[7]["hash"], rows[0]["hash"], rows[7]["hash"]]
    table, missing = ReferenceStore.open(tmp_path / "s").read_rows(want, ["ref_chosen_logps"])
    assert missing == 0 and table.column_names == ["hash", "ref_chosen_logps"]
    assert table.column("ref_chosen_logps").to_pylist() == [-8.5, -1.5, -8.5]
    with pytest.raises(StoreError, match="1 of 2 listed examples are missing"):
        store.read_rows([rows[0]["hash"], "f" * 64])
    table, missing = store.read_rows([rows[0]["hash"], "f" * 64], allow_missing=True)
    assert missing == 1 and table.num_rows == 1


def test_bad_rows_are_refused(tmp_path):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    bad = make_row(0)
    bad["ref_chosen_logps"] = float("nan")
    with pytest.raises(StoreError, match="ref_chosen_logps is not a finite number"):
        store.writer().add(bad)
    bad = make_row(0)
    bad["chosen_mask"] = [0, 1]
    with pytest.raises(StoreError, match="chosen mask length 2 != ids length 4"):
        store.writer().add(bad)


def test_identity_mismatch_lists_each_field(tmp_path):
    write(tmp_path / "s", [make_row(0)])
    other = dict(IDENTITY, dtype="bfloat16", max_seq_length=128)
    with pytest.raises(IdentityMismatchError) as err:
        ReferenceStore.create_or_open(tmp_path / "s", other)
    assert "dtype: store has 'float32', requested 'bfloat16'" in str(err.value)
    assert "max_seq_length: store has 64, requested 128" in str(err.value)


def test_corruption_is_detected_with_its_own_message(tmp_path):
    write(tmp_path / "s", [make_row(i) for i in range(6)])
    store = ReferenceStore.open(tmp_path / "s")
    shard = tmp_path / "s" / store.shards[0]["path"]
    hashes = [make_row(i)["hash"] for i in range(6)]

    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch"):
        ReferenceStore.open(tmp_path / "s").read_rows(hashes)
    report = inspect_store(tmp_path / "s", verify=True)
    assert not report["ok"] and "checksum mismatch" in report["problems"][0]

    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(StoreError, match="truncated or altered"):
        ReferenceStore.open(tmp_path / "s", verify=False).read_rows(hashes)

    manifest = tmp_path / "s" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match="torn or corrupt manifest"):
        ReferenceStore.open(tmp_path / "s")
    escaped = json.loads(text)
    escaped["shards"][0]["path"] = "../../etc/passwd"
    manifest.write_text(json.dumps(escaped))
    with pytest.raises(StoreError, match="points outside the store"):
        ReferenceStore.open(tmp_path / "s")
    manifest.unlink()
    with pytest.raises(StoreError, match="no manifest"):
        ReferenceStore.open(tmp_path / "s")


def test_same_hash_with_different_values_is_an_error(tmp_path):
    store = write(tmp_path / "s", [make_row(0)])
    with store.writer() as w:
        w.add(make_row(0))  # equal values in a second shard: fine
    assert store.read_rows([make_row(0)["hash"]])[0].num_rows == 1
    with store.writer() as w:
        w.add(make_row(0, lp=-9.0))
    with pytest.raises(StoreError, match="different reference values"):
        ReferenceStore.open(tmp_path / "s").read_rows([make_row(0)["hash"]])


WRITER = """
import sys
from dpocache.artifacts import ReferenceStore
sys.path.insert(0, {tests!r})
from test_store import IDENTITY, make_row
store = ReferenceStore.create_or_open({path!r}, IDENTITY)
with store.writer(rows_per_shard=1) as w:
    for i in range({start}, {start} + 30):
        w.add(make_row(i))
"""


def test_two_processes_write_one_store(tmp_path):
    tests = str(__import__("pathlib").Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(tests=tests, path=str(tmp_path / "s"), start=k)])
             for k in (0, 30)]
    assert [p.wait() for p in procs] == [0, 0]
    store = ReferenceStore.open(tmp_path / "s")
    assert store.num_rows() == 60 and len(store.hashes()) == 60
    assert inspect_store(tmp_path / "s", verify=True)["ok"]


def test_merge_equals_single_and_checks_identity(tmp_path):
    rows = [make_row(i) for i in range(8)]
    write(tmp_path / "a", rows[:5]).record_list("mix", [r["hash"] for r in rows[:5]])
    write(tmp_path / "b", rows[5:]).record_list("mix", [r["hash"] for r in rows[5:]])
    result = merge_stores(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    merged = ReferenceStore.open(tmp_path / "m")
    assert result["rows"] == 8 and merged.get_list("mix") == [r["hash"] for r in rows]
    table, _ = merged.read_rows([r["hash"] for r in rows])
    assert table.column("ref_chosen_logps").to_pylist() == [r["ref_chosen_logps"] for r in rows]
    ReferenceStore.create_or_open(tmp_path / "c", dict(IDENTITY, dtype="bfloat16"))
    with pytest.raises(IdentityMismatchError):
        merge_stores(tmp_path / "m2", [tmp_path / "a", tmp_path / "c"])


def test_relocated_store_still_reads(tmp_path):
    rows = [make_row(i) for i in range(4)]
    write(tmp_path / "s", rows).record_list("x", [r["hash"] for r in rows])
    (tmp_path / "s").rename(tmp_path / "moved")
    store = ReferenceStore.open(tmp_path / "moved")
    assert store.read_rows(store.get_list("x"))[0].num_rows == 4


def test_weights_fingerprint_is_cached_and_invalidated(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    first = weights_fingerprint(model)
    cache = json.loads((tmp_path / "home" / "hash-cache.json").read_text())
    assert len(cache) == 1
    assert weights_fingerprint(tmp_path / "m") == first
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert weights_fingerprint(model) != first
    assert len(json.loads((tmp_path / "home" / "hash-cache.json").read_text())) == 2


def test_tokenizer_fingerprint_tracks_content(tokenizer):
    from transformers import AutoTokenizer

    base = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer.name_or_path)) == base
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer_fingerprint(tokenizer) != base

"""Store rows: generators shared by the store tests, and validation of every malformed-row defect."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dpocache.artifacts import ReferenceStore, StoreError

IDENTITY = {"model_weights_sha256": "ab" * 32, "tokenizer_sha256": "cd" * 32, "max_seq_length": 64,
            "mask_mode": "all_assistant", "dtype": "float32", "backend": "hf"}


def row_hash(i: int, salt: str = "") -> str:
    return hashlib.sha256(f"example-{i}{salt}".encode()).hexdigest()


def make_row(i: int, *, token_logps: bool = False, shift: float = 0.0) -> dict:
    """A valid, deterministic row for example ``i`` (``shift`` changes its reference values only)."""
    rng = np.random.default_rng(i)
    row: dict = {"hash": row_hash(i)}
    for side in ("chosen", "rejected"):
        n = int(rng.integers(5, 40))
        ids = rng.integers(0, 50_000, n).astype(np.int32)
        mask = np.zeros(n, np.int8)
        mask[int(rng.integers(1, n)):] = 1
        tok = np.where(mask == 1, -rng.random(n) * 3 - shift, 0.0).astype(np.float32)
        row.update({f"{side}_input_ids": ids.tolist(), f"{side}_mask": mask.tolist(),
                    f"ref_{side}_logps": float(tok.sum(dtype=np.float64)), f"ref_{side}_tokens": int(mask.sum())})
        if token_logps:
            row[f"ref_{side}_token_logps"] = tok.tolist()
    return row


def write_rows(path, rows, per_shard: int = 3, identity: dict | None = None) -> ReferenceStore:
    store = ReferenceStore.create_or_open(path, identity or IDENTITY)
    with store.writer(rows_per_shard=per_shard) as w:
        w.add_many(rows)
    return store


def sorted_rows(path, columns=None) -> list[dict]:
    """Every row of a store, sorted by hash (one per example)."""
    store = ReferenceStore.open(path)
    table, _ = store.read_rows(sorted(store.hashes()), columns)
    return table.to_pylist()


def _broken(**changes) -> dict:
    row = make_row(3, token_logps=True)
    for key, value in changes.items():
        if value is KeyError:
            del row[key]
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("changes, message", [
    ({"ref_rejected_tokens": KeyError}, "missing column(s) ref_rejected_tokens"),
    ({"extra": 1}, "unknown column(s) extra"),
    ({"hash": "not-a-hash"}, "hash must be 64 lowercase hex characters"),
    ({"ref_chosen_logps": float("nan")}, "ref_chosen_logps is not a finite number"),
    ({"ref_rejected_logps": float("-inf")}, "ref_rejected_logps is not a finite number"),
    ({"ref_chosen_logps": 2.5}, "ref_chosen_logps = 2.5 > 0 is not a log-probability sum"),
    ({"ref_chosen_logps": "-1.0"}, "ref_chosen_logps must be a real number, got str"),
    ({"ref_chosen_tokens": 1.5}, "ref_chosen_tokens must be an integer, got float"),
    ({"chosen_mask": [0, 1]}, "chosen mask length 2 != ids length"),
    ({"rejected_input_ids": ["a", "b"]}, "rejected_input_ids must be a non-empty 1-D integer sequence"),
    ({"chosen_input_ids": []}, "chosen_input_ids must be a non-empty 1-D integer sequence"),
    ({"chosen_input_ids": [2**40] * 3, "chosen_mask": [0, 1, 1]}, "chosen_input_ids has values outside int32"),
    ({"ref_chosen_token_logps": [0.0]}, "ref_chosen_token_logps length 1 != ids length"),
    ({"ref_rejected_token_logps": None}, "give both per-token columns"),
])
def test_malformed_rows_are_refused_with_their_defect(tmp_path, changes, message):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    with pytest.raises(StoreError) as err:
        store.writer().add(_broken(**changes))
    assert message in str(err.value)
    assert store.num_rows() == 0


def test_mask_and_count_consistency(tmp_path):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    row = make_row(1)
    bad = dict(row, chosen_mask=[1] + row["chosen_mask"][1:])
    with pytest.raises(StoreError, match=r"chosen_mask\[0\] is 1"):
        store.writer().add(bad)
    bad = dict(row, rejected_mask=[0] + [2] * (len(row["rejected_mask"]) - 1))
    with pytest.raises(StoreError, match="rejected_mask must hold only 0 and 1"):
        store.writer().add(bad)
    bad = dict(row, ref_chosen_tokens=row["ref_chosen_tokens"] + 1)
    with pytest.raises(StoreError, match="ref_chosen_tokens .* != trainable tokens in mask"):
        store.writer().add(bad)


def test_per_token_values_must_agree_with_sums_and_mask(tmp_path):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    row = make_row(2, token_logps=True)
    with pytest.raises(StoreError, match="ref_chosen_token_logps sums to"):
        store.writer().add(dict(row, ref_chosen_logps=row["ref_chosen_logps"] - 1.0))
    tok = list(row["ref_rejected_token_logps"])
    tok[0] = -0.5  # position 0 is never trainable
    with pytest.raises(StoreError, match="must be 0 where rejected_mask is 0"):
        store.writer().add(dict(row, ref_rejected_token_logps=tok))


def test_numpy_inputs_are_accepted_and_stored_with_the_schema_types(tmp_path):
    row = make_row(4, token_logps=True)
    as_numpy = {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in row.items()}
    as_numpy["ref_chosen_logps"] = np.float64(row["ref_chosen_logps"])
    as_numpy["ref_chosen_tokens"] = np.int64(row["ref_chosen_tokens"])
    write_rows(tmp_path / "s", [as_numpy])
    table, _ = ReferenceStore.open(tmp_path / "s").read_rows([row["hash"]], list(row))
    assert str(table.schema.field("chosen_input_ids").type) == "list<element: int32>"
    assert str(table.schema.field("chosen_mask").type) == "list<element: int8>"
    assert str(table.schema.field("ref_chosen_tokens").type) == "int32"
    assert str(table.schema.field("ref_chosen_token_logps").type) == "list<element: float>"
    got = table.to_pylist()[0]
    assert got["chosen_input_ids"] == row["chosen_input_ids"] and got["ref_rejected_logps"] == row["ref_rejected_logps"]
    assert np.allclose(got["ref_chosen_token_logps"], row["ref_chosen_token_logps"])


def test_a_hash_added_twice_in_one_shard(tmp_path):
    store = ReferenceStore.create_or_open(tmp_path / "s", IDENTITY)
    with store.writer(rows_per_shard=10) as w:
        w.add(make_row(0))
        w.add(make_row(0))  # equal: kept once
        with pytest.raises(StoreError, match="added twice with different reference values"):
            w.add(make_row(0, shift=1.0))
    assert store.num_rows() == 1

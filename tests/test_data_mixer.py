"""Data layer: mixtures (fractions, counts, upsampling, determinism), duplicates, the example hash,
and the tokenization cache."""

import hashlib
import struct
import subprocess
import sys

import datasets
import numpy as np
import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.config import ConfigError
from dpocache.data import DataConfig, DataError, example_hash, load_preference_data, prepare_tokenizer
from dpocache.data.mixer import cap_counts


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))


def prepared(tokenizer, **kw):
    cfg = DataConfig(**kw)
    tok, _ = prepare_tokenizer(tokenizer, cfg)
    return load_preference_data(cfg, tok, progress=False)


def test_mixer_fractions_counts_upsampling_and_determinism(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", conversational_rows(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", conversational_rows(8, seed=2))
    data = prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"])
    assert [s["selected"] for s in data.stats["sources"]] == [5, 3]
    a_hashes = set(prepared(tokenizer, dataset=str(a)).dataset["hash"])
    assert sum(h in a_hashes for h in data.hashes[:5]) == 5 and not set(data.hashes[5:]) & a_hashes  # mixture order
    assert prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"]).hashes == data.hashes
    assert prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"], seed=7).hashes != data.hashes
    # fractions are floored as in open-instruct: 0.25 of 10 rows is 2
    assert prepared(tokenizer, mixer_list=[str(a), "0.25"]).stats["sources"][0]["selected"] == 2
    up = prepared(tokenizer, mixer_list=[str(a), "2.5"])
    counts = np.unique(np.unique(up.hashes, return_counts=True)[1], return_counts=True)
    assert len(up.hashes) == 25 and len(up.dataset) == 10  # repeats train, unique examples are scored once
    assert dict(zip(*counts)) == {2: 5, 3: 5}
    assert len(prepared(tokenizer, mixer_list=[str(b), "13"]).hashes) == 13  # a count above the size upsamples
    capped = prepared(tokenizer, mixer_list=[str(a), "1.0", str(b), "1.0"], max_train_samples=12)
    assert len(capped.hashes) == 12
    assert capped.name == "a+b"  # readable: the sources' names (a store keeps names unique per mixture digest)


def test_dataset_is_shorthand_and_splits_pick_files(tokenizer, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", conversational_rows(4, seed=1))
    write_jsonl(folder / "test.jsonl", conversational_rows(3, seed=2))
    assert len(prepared(tokenizer, dataset=str(folder)).dataset) == 4
    both = prepared(tokenizer, mixer_list=[str(folder), "1.0", str(folder), "1.0"], mixer_list_splits=["train", "test"])
    assert [s["kept"] for s in both.stats["sources"]] == [4, 3]
    assert both.name == "data+data.test"  # a split other than train is part of the name
    assert prepared(tokenizer, dataset=str(folder)).hashes == \
        prepared(tokenizer, mixer_list=[str(folder), "1.0"]).hashes


def test_max_train_samples_caps_each_source_in_proportion(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", conversational_rows(30, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", conversational_rows(20, seed=2))
    mixture = [str(a), "1.0", str(b), "10"]
    whole = prepared(tokenizer, mixer_list=mixture)
    capped = prepared(tokenizer, mixer_list=mixture, max_train_samples=12)
    # 30 + 10 selected, capped at 12: 12 * 30/40 = 9 from a and 12 * 10/40 = 3 from b (not the first 12 of a)
    sources = capped.stats["sources"]
    assert [(s["selected"], s["train_examples"]) for s in sources] == [(30, 9), (10, 3)]
    a_hashes, b_hashes = whole.hashes[:30], whole.hashes[30:]
    assert len(capped.hashes) == capped.stats["totals"]["examples"] == 12
    assert capped.hashes[:9] == [h for h in a_hashes if h in set(capped.hashes[:9])]  # a's, in selection order
    assert set(capped.hashes[9:]) <= set(b_hashes) and len(set(capped.hashes[9:])) == 3
    assert len(capped.dataset) == 12  # only what trains is scored
    again = prepared(tokenizer, mixer_list=mixture, max_train_samples=12)
    assert again.hashes == capped.hashes and again.name == capped.name  # deterministic
    assert prepared(tokenizer, mixer_list=mixture, max_train_samples=12, seed=3).hashes[:9] != capped.hashes[:9]
    from dpocache.data.mixer import mixture_digest

    assert capped.name == whole.name == "a+b"  # readable; the store keeps names unique per mixture digest
    assert mixture_digest(mixture, ["train"], 12, 42) != mixture_digest(mixture, ["train"], None, 42)
    assert [s["train_examples"] for s in whole.stats["sources"]] == [30, 10]  # no cap: what is selected
    assert prepared(tokenizer, mixer_list=mixture, max_train_samples=40).hashes == whole.hashes


@pytest.mark.parametrize("selected,cap,expected", [
    ([1000, 50], 120, [114, 6]),  # 114.29 + 5.71: the larger remainder (b's) gets the last one
    ([10, 8], 12, [7, 5]),        # 6.67 + 5.33
    ([1, 1, 1], 2, [1, 1, 0]),    # equal remainders: the earlier sources first
    ([0, 10], 5, [0, 5]),
    ([3, 4], 7, [3, 4]),          # a cap at or above the total changes nothing
    ([3, 4], None, [3, 4]),
])
def test_cap_counts_are_proportional_and_sum_to_the_cap(selected, cap, expected):
    counts = cap_counts(selected, cap)
    assert counts == expected
    assert sum(counts) == min(cap or sum(selected), sum(selected))
    assert all(0 <= c <= s for c, s in zip(counts, selected))


@pytest.mark.parametrize("amount,message", [("1e3", "neither a fraction"), ("-1", "neither a fraction"),
                                            ("0", "must be > 0"), ("0.0", "must be > 0"), ("abc", "neither")])
def test_bad_amounts_are_config_errors(amount, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(mixer_list=["x.jsonl", amount])


def test_duplicates_collapse_to_first_occurrence_and_are_counted(tokenizer, tmp_path):
    rows = conversational_rows(4)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:2])
    data = prepared(tokenizer, dataset=str(path))
    assert len(data.dataset) == 4 and data.stats["totals"]["duplicates"] == 2
    other = write_jsonl(tmp_path / "o.jsonl", rows[1:2] + conversational_rows(2, seed=9))
    mixed = prepared(tokenizer, mixer_list=[str(path), "1.0", str(other), "1.0"])
    assert [s["duplicates"] for s in mixed.stats["sources"]] == [2, 1] and len(mixed.dataset) == 6


def test_rerun_reuses_the_tokenization_cache(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", conversational_rows(6))
    cache = tmp_path / "cache"
    first = prepared(tokenizer, dataset=str(path), dataset_cache_dir=str(cache))
    files = {p: p.stat().st_mtime_ns for p in cache.glob("*.arrow")}
    assert len(files) == 1  # the staged rows were removed; the cache holds tokens, not the JSON rows
    (cached,) = files
    columns = set(datasets.Dataset.from_file(str(cached)).column_names)
    assert not {"chosen", "rejected"} & columns and {"row", "hash", "chosen_input_ids", "rejected_mask"} <= columns
    again = prepared(tokenizer, dataset=str(path), dataset_cache_dir=str(cache))
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.arrow")} == files  # not re-tokenized
    assert again.dataset["hash"] == first.dataset["hash"]
    prepared(tokenizer, dataset=str(path), dataset_cache_dir=str(cache), max_seq_length=64)
    assert len(list(cache.glob("*.arrow"))) == 2  # a setting that changes the tokens changes the fingerprint


def test_a_bad_row_leaves_no_staged_rows_behind(tokenizer, tmp_path):
    rows = conversational_rows(5)
    rows[3] = {"chosen": rows[3]["chosen"]}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="line 4"):
        prepared(tokenizer, dataset=str(path), dataset_cache_dir=str(cache))
    assert list(cache.iterdir()) == []
    skipped = prepared(tokenizer, dataset=str(path), dataset_cache_dir=str(cache), on_bad_row="skip")
    assert len(skipped.dataset) == 4 and [p.name.startswith("rows-") for p in cache.iterdir()] == [False]


def _golden(c_ids, c_mask, r_ids, r_mask):
    """The documented encoding, written independently of the implementation."""
    h = hashlib.sha256(b"dpocache-example-v1\0")
    for values, fmt in ((c_ids, "<i"), (c_mask, "<b"), (r_ids, "<i"), (r_mask, "<b")):
        h.update(struct.pack("<Q", len(values)) + b"".join(struct.pack(fmt, v) for v in values))
    return h.hexdigest()


def test_example_hash_golden_and_stable_across_processes(tokenizer, tmp_path):
    args = ([1, 2, 3, 40000], [0, 0, 1, 1], [1, 2, 5], [0, 0, 1])
    assert example_hash(*args) == _golden(*args)
    # Golden values: a change of the encoding must bump HASH_VERSION (and invalidate stores knowingly).
    assert example_hash(*args) == "824a85b22521604ed8975f2764fc86506bc4b6608121c5f6d23b8821e2b1d013"
    assert example_hash([], [], [7], [0]) == "7344d7810bda0f58ebb0411ef0129651c58aa45a558f13c2799203939bd25fe0"
    assert example_hash(*args) == example_hash(*[np.array(a, dtype=np.int64) for a in args])
    assert example_hash(*args) != example_hash([1, 2, 3, 40000], [0, 1, 1, 1], [1, 2, 5], [0, 0, 1])
    assert example_hash(*args) != example_hash(*args[2:], *args[:2])  # chosen and rejected are not symmetric
    code = "from dpocache.data import example_hash; print(example_hash([1,2,3,40000],[0,0,1,1],[1,2,5],[0,0,1]))"
    for seed in ("0", "123"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "", "HF_HUB_OFFLINE": "1"}, check=True).stdout
        assert out.strip() == example_hash(*args)
    # dataset hashes are the hash of the stored ids and masks, whatever the row order
    rows = conversational_rows(5)
    fwd = prepared(tokenizer, dataset=str(write_jsonl(tmp_path / "f.jsonl", rows)))
    rev = prepared(tokenizer, dataset=str(write_jsonl(tmp_path / "r.jsonl", rows[::-1])))
    assert fwd.dataset["hash"] == rev.dataset["hash"][::-1]
    ex = fwd.dataset[0]
    assert ex["hash"] == _golden(ex["chosen_input_ids"], ex["chosen_mask"], ex["rejected_input_ids"],
                                 ex["rejected_mask"])

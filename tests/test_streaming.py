"""Stage two streams the store: the batches it reads equal a plain read of the whole store (ids, masks, reference
values, order) for the same seed and ranks; resume skips without reading; the index is cached; a store
damaged after training started stops training with a message naming the shard."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import conversational_rows, score_rows

from dpocache.artifacts import ReferenceStore, StoreError
from dpocache.config import build
from dpocache.modeling import ModelConfig
from dpocache.stages.train import Recipe, TrainConfig
from dpocache.stages.train.batching import epoch_order, micro_batches
from dpocache.stages.train.loader import Collator, Prefetcher, plan
from dpocache.stages.train.source import StoreSource
from dpocache.stages.train.store_index import list_index

ROWS = 40


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model_dir):
    # small shards: a batch spans several shards and row groups
    return score_rows(tmp_path_factory.mktemp("stream"), tiny_model_dir, conversational_rows(ROWS, seed=11),
                      "--store_dataset", "d", "--rows_per_shard", "7")


def whole_store(store_dir):
    """Every row of every shard, read the simple way: hash -> row dict."""
    rows = {}
    for shard in sorted((store_dir / "shards").glob("shard-*.parquet")):
        for row in pq.read_table(shard).to_pylist():
            rows[row["hash"]] = row
    return rows


def expected_batches(store_dir, *, per_device, accumulation, world, rank, seed, epochs):
    store = ReferenceStore.open(store_dir)
    listed = store.get_list("d")
    rows = whole_store(store_dir)
    lengths = np.array([max(len(rows[h]["chosen_input_ids"]), len(rows[h]["rejected_input_ids"])) for h in listed])
    out = []
    for epoch in range(epochs):
        order = epoch_order(lengths, per_device * world * accumulation, seed, epoch)
        out += [[rows[listed[i]] for i in idx] for idx in micro_batches(order, per_device, rank, world)]
    return out


def streamed(store_dir, *, per_device, accumulation, world, rank, seed, count, skip=0):
    store = ReferenceStore.open(store_dir)
    source = StoreSource(store.root, list_index(store, "d"))
    order = plan(source.lengths, per_device=per_device, accumulation=accumulation, rank=rank, world=world,
                 seed=seed, group_by_length=True, skip=skip)
    batches = Prefetcher(source, order, Collator(pad_id=0, pad_to_multiple_of=8), depth=3)
    try:
        return [next(batches) for _ in range(count)]
    finally:
        batches.close()


def assert_same(batch, rows):
    b = len(rows)
    assert batch.pairs == b
    assert [h.decode() for h in batch.hashes] == [r["hash"] for r in rows]
    for k, side in enumerate(("chosen", "rejected")):
        for j, row in enumerate(rows):
            ids, mask = row[f"{side}_input_ids"], row[f"{side}_mask"]
            n = len(ids)
            assert batch.input_ids[k * b + j, :n].tolist() == ids
            assert batch.mask[k * b + j, :n].tolist() == mask
            assert batch.attention_mask[k * b + j].sum().item() == n
            assert (batch.input_ids[k * b + j, n:] == 0).all()
    reference = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"], r["ref_chosen_tokens"],
                               r["ref_rejected_tokens"]] for r in rows], dtype=torch.float32)
    assert torch.equal(batch.reference, reference)
    assert batch.input_ids.shape[1] % 8 == 0


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1)])
def test_streamed_batches_equal_a_plain_read(store_dir, world, rank):
    kw = dict(per_device=3, accumulation=2, world=world, rank=rank, seed=5)
    expected = expected_batches(store_dir, epochs=2, **kw)
    got = streamed(store_dir, count=len(expected), **kw)
    for batch, rows in zip(got, expected):
        assert_same(batch, rows)
    assert sum(b.pairs for b in got) == sum(len(r) for r in expected)


def test_ranks_read_disjoint_examples_of_each_step(store_dir):
    kw = dict(per_device=4, accumulation=1, world=2, seed=9, count=5)
    a, b = (streamed(store_dir, rank=r, **kw) for r in (0, 1))
    for x, y in zip(a, b):
        assert not set(x.hashes.tolist()) & set(y.hashes.tolist())


def test_resume_position_is_an_index_into_the_plan(store_dir):
    kw = dict(per_device=3, accumulation=1, world=1, rank=0, seed=2)
    full = streamed(store_dir, count=30, **kw)  # crosses into the third epoch
    resumed = streamed(store_dir, count=12, skip=18, **kw)
    for x, y in zip(full[18:], resumed):
        assert x.hashes.tolist() == y.hashes.tolist() and torch.equal(x.input_ids, y.input_ids)


def test_index_is_cached_and_reused(store_dir, capsys):
    from dpocache.files import dpocache_home

    import shutil

    store = ReferenceStore.open(store_dir)
    for path in (dpocache_home() / "index").iterdir():
        if path.is_dir():
            shutil.rmtree(path)
    first = list_index(store, "d")
    assert "indexing list 'd'" in capsys.readouterr().out
    second = list_index(store, "d")
    assert capsys.readouterr().out == ""
    assert isinstance(second.reference, np.memmap)  # loaded pages on demand, not read whole
    assert np.array_equal(first.hashes, second.hashes) and np.array_equal(first.reference, second.reference)
    assert len(first) == ROWS and first.lengths.min() > 0


@pytest.mark.parametrize("damage, message", [
    ("flip", r"shards/shard-[0-9a-f]+\.parquet: shard checksum mismatch"),
    ("list", r"example list 'd' checksum mismatch"),
    ("list_deleted", r"lists/d\.[0-9a-f.]*json"),
    ("rows", r"shards/shard-[0-9a-f]+\.parquet: shard has \d+ rows, manifest says"),
])
def test_cached_index_is_not_reused_for_damaged_files(store_dir, tmp_path, damage, message):
    """The cache serves only the very files it was built and verified from: a shard or list edited in place (same
    size), a deleted list or an edited manifest entry is read and checked again, and refused naming the file."""
    import json
    import shutil

    copy = shutil.copytree(store_dir, tmp_path / "store")
    list_index(ReferenceStore.open(copy), "d")  # built and cached
    manifest = json.loads((copy / "manifest.json").read_text())
    if damage == "flip":
        shard = copy / manifest["shards"][1]["path"]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage in ("list", "list_deleted"):
        path = copy / manifest["lists"]["d"]["path"]
        hashes = json.loads(path.read_text())
        path.write_text(json.dumps(hashes[1:] + hashes[:1])) if damage == "list" else path.unlink()
    else:
        manifest["shards"][0]["rows"] += 1
        (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=message):
        list_index(ReferenceStore.open(copy), "d")


def test_source_holds_no_token_data(store_dir):
    """The in-memory index is per-example metadata: a few dozen bytes per example, no token ids."""
    index = list_index(ReferenceStore.open(store_dir), "d")
    per_example = sum(a.nbytes for a in (index.hashes, index.lengths, index.reference, index.shard, index.row))
    assert per_example / len(index) < 130


def recipe_for(tiny_model_dir, store_dir, out, **extra):
    values = dict(store=str(store_dir), store_dataset="d", output_dir=str(out),
                  per_device_train_batch_size=2, max_train_steps=6, checkpointing_steps=None, prefetch_batches=1,
                  **extra)
    (cfg,) = build([TrainConfig], values)
    return Recipe(ModelConfig(model_name_or_path=str(tiny_model_dir)), cfg, show_progress=False).setup()


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_store_damaged_after_training_started_names_the_shard(tiny_model_dir, store_dir, tmp_path, damage):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    recipe = recipe_for(tiny_model_dir, copy, tmp_path / "out")  # the index is built: training has started
    shards = sorted((copy / "shards").glob("shard-*.parquet"))
    for shard in shards:
        if damage == "delete":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"shards/shard-[0-9a-f]+\.parquet: shard (deleted|changed on disk)"):
        recipe.train()

"""Stage one's work split, device placement, host batches and bulk shard validation (real models, real stores)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import conversational_rows, write_jsonl

from dpocache.artifacts import ReferenceStore, StoreError
from dpocache.artifacts.shards import normalize_row
from dpocache.cli import main
from dpocache.data import DataConfig
from dpocache.devices import pin_host_memory, resolve_device
from dpocache.logprobs import full_token_logps, pad_batch
from dpocache.modeling import ModelConfig
from dpocache.stages.score import ScoreConfig, setup
from dpocache.stages.scoring.batches import EXAMPLE_COLUMNS, ChunkData, ChunkScores, batch_order, build_batch
from dpocache.stages.scoring.commit import shard_table, token_table
from dpocache.stages.scoring.hf import HFScorer
from dpocache.stages.scoring.plan import part_order, plan_chunks, split_levels


def test_every_example_lands_in_exactly_one_part_of_equal_size():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 40, 1023, 1025):
        hashes = [f"{x:064x}" for x in rng.integers(0, 2**62, n)]
        for parts in (2, 3, 4, 7):
            shares = [part_order(hashes, [("part", parts, i)]) for i in range(parts)]
            sizes = [len(s) for s in shares]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, (n, parts, sizes)
            assert sorted(i for s in shares for i in s) == list(range(n))
            for share in shares:
                assert [hashes[i] for i in share] == sorted(hashes[i] for i in share)  # hash order within a part


def test_ranks_deal_their_part_again(monkeypatch):
    hashes = [f"{x:064x}" for x in np.random.default_rng(1).integers(0, 2**62, 101)]
    whole_part = part_order(hashes, [("part", 3, 1)])
    monkeypatch.setenv("WORLD_SIZE", "4")
    ranks = []
    for r in range(4):
        monkeypatch.setenv("RANK", str(r))
        levels = split_levels(3, 1)
        assert levels == [("part", 3, 1), ("rank", 4, r)]
        ranks.append(part_order(hashes, levels))
    assert sorted(i for share in ranks for i in share) == sorted(whole_part)
    assert max(map(len, ranks)) - min(map(len, ranks)) <= 1


def test_chunks_cut_each_part_and_skip_what_the_store_holds():
    hashes = [f"{x:064x}" for x in range(40, 0, -1)]
    levels = [("part", 2, 1)]
    units = plan_chunks(hashes, set(), 3, levels)
    order = part_order(hashes, levels)
    assert [list(u.rows) for u in units] == [order[k:k + 3] for k in range(0, 20, 3)]
    existing = set(units[1].hashes) | {units[2].hashes[0]}
    again = plan_chunks(hashes, existing, 3, levels)
    assert [u.key for u in again] == [u.key for k, u in enumerate(units) if k != 1]  # same chunks, same keys


def test_num_shards_4_over_40_examples(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(40, seed=21))
    store = tmp_path / "store"
    scored = []
    for i in range(4):
        assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--store",
                     str(store), "--num_shards", "4", "--shard_index", str(i), "--rows_per_shard", "4"]) == 0
        out = capsys.readouterr().out
        scored.append(int(re.search(r"\((\d+) scored", out).group(1)))
        assert f"part {i}/4" in out
    assert all(8 <= s <= 12 for s in scored) and sum(scored) == 40, scored
    opened = ReferenceStore.open(store)
    assert opened.num_rows() == 40 and len(opened.hashes()) == 40  # every example once


@pytest.fixture
def plan(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(6, seed=4))
    plan = setup(ModelConfig(model_name_or_path=str(tiny_model_dir)), DataConfig(dataset=str(data)),
                 ScoreConfig(store=str(tmp_path / "store")), progress=False)
    yield plan
    plan.store.close()


def test_scorer_model_batches_and_outputs_sit_on_the_resolved_device(tiny_model_dir, plan):
    device = resolve_device("auto")
    model_cfg = ModelConfig(model_name_or_path=str(tiny_model_dir))
    scorer = HFScorer(model_cfg, plan.tokenizer, 5, device)
    assert {p.device for p in scorer.model.parameters()} == {device}
    chunk = ChunkData(plan.dataset.select_columns(EXAMPLE_COLUMNS).with_format("arrow")[list(range(6))])
    pad = plan.tokenizer.pad_token_id
    seen = []
    for batch in scorer.host_batches(chunk):
        assert batch.ids.device.type == "cpu" and batch.ids.is_pinned() == (device.type == "cuda")
        expected = pad_batch([chunk.sequence(k).tolist() for k in batch.seqs],
                             [chunk.sequence_mask(k).tolist() for k in batch.seqs], pad)
        for got, want in zip((batch.ids, batch.attn, batch.tmask), expected):
            assert torch.equal(got, want)
        assert torch.equal(batch.positions, torch.stack(torch.nonzero(batch.tmask[:, 1:], as_tuple=True)))
        moved = scorer.to_device(batch)  # ids, attention mask, trainable mask, trained positions
        assert [t.device for t in moved] == [device] * 4
        values, packed = scorer.forward(*moved)
        assert values.device == packed.device == device and packed.dtype == torch.float64
        seen += batch.seqs.tolist()
    assert sorted(seen) == list(range(12)) and len(batch_order(chunk, 5)) == 3
    scores = scorer.score(chunk, keep_tokens=True).collect()
    for k in range(12):  # against the model's own forward (full logits) on the sequence alone
        ids, attn, mask = pad_batch([chunk.sequence(k).tolist()], [chunk.sequence_mask(k).tolist()], pad,
                                    device=device)
        ref = full_token_logps(scorer.model, ids, attn, mask)[0].double().cpu().numpy()
        lo, hi = chunk.offsets[k], chunk.offsets[k + 1]
        assert scores.counts[k] == chunk.sequence_mask(k).sum()
        assert scores.sums[k] == pytest.approx(ref.sum(), abs=1e-4)
        np.testing.assert_allclose(scores.tokens[lo:hi], ref, atol=1e-5)
    scorer.close()
    assert not hasattr(scorer, "model")


def test_a_device_the_machine_lacks_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", conversational_rows(4, seed=2))
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--store",
                 str(tmp_path / "s"), "--device", missing]) == 2
    err = capsys.readouterr().err
    expected = "GPU(s)" if torch.cuda.is_available() else "CUDA is not available on this machine"
    assert f"--device {missing}: " in err and expected in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def small_chunk() -> ChunkData:
    ids = pa.array([[5, 6, 7, 8], [9, 10, 11]], pa.list_(pa.int32()))
    masks = pa.array([[0, 0, 1, 1], [0, 1, 1]], pa.list_(pa.int8()))
    r_ids = pa.array([[5, 6, 12], [9, 13, 14, 15, 16]], pa.list_(pa.int32()))
    r_masks = pa.array([[0, 0, 1], [0, 1, 1, 1, 1]], pa.list_(pa.int8()))
    return ChunkData(pa.table({"hash": ["a" * 64, "b" * 64], "chosen_input_ids": ids, "chosen_mask": masks,
                               "rejected_input_ids": r_ids, "rejected_mask": r_masks}))


def test_host_batches_are_pinned_exactly_when_bound_for_cuda():
    assert pin_host_memory(torch.device("cuda", 1)) and pin_host_memory("cuda")
    assert not pin_host_memory(torch.device("cpu"))
    chunk = small_chunk()
    seqs = np.array([2, 0, 3])
    plain = build_batch(chunk, seqs, 0, pin=False)
    assert not any(t.is_pinned() for t in (plain.ids, plain.attn, plain.tmask))
    assert plain.ids.tolist() == [[5, 6, 12, 0, 0], [5, 6, 7, 8, 0], [9, 13, 14, 15, 16]]
    assert plain.tmask.tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 1, 1, 1, 1]] and plain.tokens == 12
    if torch.cuda.is_available():
        pinned = build_batch(chunk, seqs, 0, pin=True)
        assert all(t.is_pinned() for t in (pinned.ids, pinned.attn, pinned.tmask))
    else:  # the flag reaches the allocator: pinned memory needs an accelerator
        with pytest.raises(RuntimeError, match="pin"):
            build_batch(chunk, seqs, 0, pin=True)


def scored(chunk: ChunkData, seed: int = 0) -> ChunkScores:
    rng = np.random.default_rng(seed)
    tokens = np.where(chunk.mask == 1, -rng.random(chunk.tokens), 0).astype(np.float32)
    sums = np.add.reduceat(tokens.astype(np.float64), chunk.offsets[:-1])
    return ChunkScores(sums, np.add.reduceat(chunk.mask.astype(np.int64), chunk.offsets[:-1]), tokens)


validate_table = ReferenceStore.check_table  # what add_table runs before a bulk-built shard is written


@pytest.mark.parametrize("column, index, value, message", [
    ("ref_chosen_logps", 1, float("nan"), "ref_chosen_logps is not a finite number"),
    ("ref_rejected_logps", 0, 0.5, "ref_rejected_logps = 0.5 > 0 is not a log-probability sum"),
    ("ref_chosen_tokens", 0, 5, "ref_chosen_tokens 5 != trainable tokens in mask 2"),
    ("chosen_mask", 1, [1, 1, 1], "chosen_mask[0] is 1, but the first token has no log-prob"),
    ("rejected_mask", 0, [0, 2, 1], "rejected_mask must hold only 0 and 1"),
    ("chosen_mask", 0, [0, 1], "chosen mask length 2 != ids length 4"),
    ("ref_rejected_token_logps", 1, [-1.0, -0.1, -0.1, -0.1, -0.1], "must be 0 where rejected_mask is 0"),
    ("ref_chosen_token_logps", 0, [0.0, 0.0, -9.0, -9.0], "ref_chosen_token_logps sums to -18.0"),
    ("hash", 1, "a" * 64, "the same hash appears twice in one shard"),
    ("hash", 0, "XYZ", "hash must be 64 lowercase hex characters"),
])
def test_bulk_validation_names_the_row_and_defect(column, index, value, message):
    chunk = small_chunk()
    table = shard_table(chunk, scored(chunk), keep_tokens=True)
    rows = table.to_pylist()
    for row in rows:
        normalize_row(row)  # the valid table passes the per-row structure checks too
    validate_table(table)
    rows[index][column] = value
    bad = pa.Table.from_pylist(rows, schema=table.schema)
    with pytest.raises(StoreError, match=re.escape(message)) as info:
        validate_table(bad)
    if column != "hash":
        assert str(info.value).startswith(f"row {rows[index]['hash']}")


def test_added_per_token_values_must_reproduce_the_stored_sums(tmp_path):
    chunk = small_chunk()
    scores = scored(chunk)
    stored = shard_table(chunk, scores, keep_tokens=False)
    completed = token_table(ChunkData(stored), scores, "S")
    assert completed.column("ref_chosen_logps").equals(stored.column("ref_chosen_logps"))
    validate_table(completed)
    off = stored.set_column(5, "ref_chosen_logps", pa.array(scores.sums[:2] + [0.0, 0.5]))
    with pytest.raises(StoreError, match="the recomputed chosen per-token values sum to .* does not reproduce"):
        token_table(ChunkData(off), scores, "S")

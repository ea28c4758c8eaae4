"""Stage one: score a preference dataset with a frozen reference model into a reference store.

Recipe steps: :func:`setup` (tokenizer, data, identity, store, what is left to score),
:func:`score` (reference forward passes, rows written shard by shard) and :func:`run_score`
(both, then the named example list and freeing the model). A SIGTERM/SIGUSR1 while scoring stops after the
chunk in flight is committed, with :class:`~dpocache.preemption.Preempted` (exit code 75); the same
command run again scores only what is missing.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dpocache import preemption
from dpocache.artifacts import ReferenceStore
from dpocache.artifacts.identity import library_versions, text_fingerprint, tokenizer_fingerprint, weights_fingerprint
from dpocache.config import ConfigError, check, opt
from dpocache.console import log
from dpocache.data import HASH_VERSION, DataConfig, load_preference_data, mixture_digest, prepare_tokenizer
from dpocache.files import dpocache_home
from dpocache.logprobs import TokenLogps, pad_batch
from dpocache.modeling import (
    ModelConfig,
    ModelLoadError,
    check_model_config,
    check_sequence_lengths,
    load_causal_lm,
    load_tokenizer,
    local_model_dir,
    resize_for_tokenizer,
)


@dataclass
class ScoreConfig:
    store: str | None = opt(None, "Reference store directory (created when missing; default: one per reference "
                             "identity under $DPOCACHE_HOME/stores).", group="store")
    store_dataset: str | None = opt(
        None, "Name under which the ordered example list of this dataset/mixture is recorded in the store "
        "(default: derived from the mixture).", group="store")
    backend: Literal["hf", "vllm"] = opt("hf", "Stage-one scoring engine: HF forward passes or vLLM "
                                         "prompt log-probs.", group="scoring")
    batch_size: int = opt(8, "Sequences per reference forward pass (sorted by length).", group="scoring")
    rows_per_shard: int = opt(1024, "Examples per Parquet shard; a crash loses at most one shard.",
                              group="store")
    save_token_logps: bool = opt(False, "Also store per-token reference log-probs.", group="store")
    num_shards: int = opt(1, "Split the dataset by example hash into this many disjoint parts ...",
                          group="scoring")
    shard_index: int = opt(0, "... and score only this part (0-based).", group="scoring")

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.rows_per_shard >= 1, "rows_per_shard must be >= 1")
        check(self.num_shards >= 1, "num_shards must be >= 1")
        check(0 <= self.shard_index < self.num_shards, "shard_index must be in [0, num_shards)")


@dataclass
class ScoreResult:
    store: str
    list_name: str
    examples: int
    scored: int
    reused: int
    seconds: float
    tokens: int = 0
    data_stats: dict = field(default_factory=dict)


def _partition(score_cfg: ScoreConfig) -> tuple[int, int]:
    """(parts, index): explicit --num_shards/--shard_index, else one part per launched rank."""
    if score_cfg.num_shards > 1:
        return score_cfg.num_shards, score_cfg.shard_index
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0"))


def plan_chunks(hashes: list[str], existing: set[str], rows_per_chunk: int, parts: int, index: int) -> list[list[int]]:
    """Deterministic work units: the examples sorted by hash, cut into chunks of ``rows_per_chunk``.

    Chunk k belongs to part ``k % parts``. Each chunk is scored as one shard, so a rerun after a crash
    (completed chunks are in the store, the one in flight is not) scores exactly the same batches as
    an uninterrupted run, and parts of a split score the same batches as a single job: the values
    are bit-identical, not merely close.
    """
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    chunks = [order[k:k + rows_per_chunk] for k in range(0, len(order), rows_per_chunk)]
    todo = ([i for i in chunk if hashes[i] not in existing] for k, chunk in enumerate(chunks) if k % parts == index)
    return [chunk for chunk in todo if chunk]


def default_store_dir(identity: dict):
    """Without --store: a store per reference identity in the user cache, reused by later runs."""
    digest = text_fingerprint(json.dumps(identity, sort_keys=True))[:16]
    return dpocache_home() / "stores" / digest


def scoring_dtype(model_cfg: ModelConfig, score_cfg: ScoreConfig, vllm_options=None) -> str:
    """The dtype the reference runs in: ``--dtype``, or for the vLLM backend ``--vllm_dtype`` when given."""
    if score_cfg.backend == "vllm" and vllm_options is not None and vllm_options.vllm_dtype:
        return vllm_options.vllm_dtype
    return model_cfg.dtype


def reference_model_dir(model_cfg: ModelConfig) -> Path:
    """The directory of the reference's files (a local path, or the hub snapshot of the requested revision)."""
    model_dir = local_model_dir(model_cfg.model_name_or_path, model_cfg.model_revision)
    if model_dir is None:
        raise ConfigError(f"model '{model_cfg.model_name_or_path}' is not available locally")
    return model_dir


def reference_identity(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig,
                       tokenizer, vllm_options=None) -> dict:
    """What makes two reference computations interchangeable (compared field by field)."""
    model_dir = reference_model_dir(model_cfg)
    try:
        weights = weights_fingerprint(model_dir)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from None
    return {
        "model_weights_sha256": weights,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "chat_template_sha256": text_fingerprint(tokenizer.chat_template or ""),
        "max_seq_length": data_cfg.max_seq_length,
        "mask_mode": data_cfg.mask_mode,
        "add_bos": data_cfg.add_bos,
        "dtype": scoring_dtype(model_cfg, score_cfg, vllm_options),
        "backend": score_cfg.backend,
        "example_hash_version": HASH_VERSION,
    }


class HFScorer:
    """Reference log-probs with HF forward passes, only at trainable positions."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, batch_size: int):
        self.model = load_causal_lm(model_cfg)
        resize_for_tokenizer(self.model, tokenizer)
        self.logps = TokenLogps(self.model)  # no router aux loss in scoring
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def token_logps(self, sequences: list, masks: list, on_batch=None) -> list[np.ndarray]:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out: list[np.ndarray | None] = [None] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, attn, tmask = pad_batch([sequences[i] for i in idx], [masks[i] for i in idx], self.pad_id)
            values = self.logps(ids, attn, tmask).double().numpy()
            for row, i in enumerate(idx):
                out[i] = values[row, :len(sequences[i])]
            if on_batch:
                on_batch(len(idx), int(attn.sum()))
        return out  # type: ignore[return-value]

    def close(self) -> None:
        del self.logps, self.model
        gc.collect()


class VLLMAdapter:
    """The vLLM backend behind the same interface (masks are applied by the caller)."""

    def __init__(self, model_cfg: ModelConfig, score_cfg: ScoreConfig, vllm_options, seed: int):
        from dpocache.stages.vllm_backend import VLLMOptions, VLLMScorer

        # the files the identity hashed (the requested revision's snapshot), in the dtype the identity names
        options = dataclasses.replace(vllm_options or VLLMOptions(),
                                      vllm_dtype=scoring_dtype(model_cfg, score_cfg, vllm_options))
        self.scorer = VLLMScorer(str(reference_model_dir(model_cfg)), options, seed=seed)

    def token_logps(self, sequences: list, masks: list, on_batch=None) -> list[np.ndarray]:
        values = self.scorer.token_logps(sequences)
        if on_batch:
            on_batch(len(sequences), sum(len(s) for s in sequences))
        return values

    def close(self) -> None:
        self.scorer.close()


@dataclass
class ScorePlan:
    tokenizer: object
    dataset: object  # datasets.Dataset of tokenized examples
    list_name: str
    store: ReferenceStore
    chunks: list[list[int]]
    data_stats: dict
    hashes: list[str]  # the ordered example list (with repeats when a source is upsampled)
    reused: int = 0    # examples already in the store

    @property
    def pending(self) -> int:
        return sum(len(c) for c in self.chunks)


def setup(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, *, vllm_options=None,
          progress=True) -> ScorePlan:
    check(model_cfg.model_name_or_path is not None, "score needs --model_name_or_path")
    config = check_model_config(model_cfg)
    tok_name = data_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path
    tokenizer = load_tokenizer(tok_name, revision=model_cfg.model_revision,
                               trust_remote_code=model_cfg.trust_remote_code)
    tokenizer, _ = prepare_tokenizer(tokenizer, data_cfg)
    prepared = load_preference_data(data_cfg, tokenizer, progress=progress)
    check_sequence_lengths(config, longest_sequence(prepared.dataset), f"the data of {prepared.name}")
    identity = reference_identity(model_cfg, data_cfg, score_cfg, tokenizer, vllm_options)
    info = library_versions()
    info.update(model_name=str(model_cfg.model_name_or_path), model_revision=model_cfg.model_revision,
                tokenizer_name=str(tok_name), chat_template=tokenizer.chat_template, pad_token=tokenizer.pad_token)
    root = score_cfg.store or str(default_store_dir(identity))
    store = ReferenceStore.create_or_open(root, identity, versions=info)
    existing = store.hashes()
    parts, index = _partition(score_cfg)
    hashes = prepared.dataset["hash"][:]  # a list: a datasets Column reads element by element
    chunks = plan_chunks(hashes, existing, score_cfg.rows_per_shard, parts, index)
    reused = sum(1 for h in hashes if h in existing)
    name = score_cfg.store_dataset or store.free_list_name(prepared.name, mixture_digest(data_cfg))
    return ScorePlan(tokenizer, prepared.dataset, name, store, chunks, prepared.stats, prepared.hashes, reused)


def longest_sequence(dataset) -> int:
    """Tokens of the longest chosen or rejected sequence of a tokenized dataset (read in Arrow batches)."""
    import pyarrow.compute as pc

    longest = 0
    columns = dataset.select_columns(["chosen_input_ids", "rejected_input_ids"]).with_format("arrow")
    for batch in columns.iter(batch_size=8192):
        for name in ("chosen_input_ids", "rejected_input_ids"):
            top = pc.max(pc.list_value_length(batch[name])).as_py()
            longest = max(longest, top or 0)
    return longest


def _rows_for(batch: dict, logps: list[np.ndarray], keep_token_logps: bool) -> list[dict]:
    rows = []
    n = len(batch["hash"])
    for j in range(n):
        row = {"hash": batch["hash"][j]}
        for side, k in (("chosen", j), ("rejected", n + j)):
            ids, mask = batch[f"{side}_input_ids"][j], batch[f"{side}_mask"][j]
            m = np.asarray(mask, dtype=bool)
            values = np.where(m, logps[k][:len(ids)], 0.0)
            row[f"{side}_input_ids"], row[f"{side}_mask"] = ids, mask
            row[f"ref_{side}_logps"] = float(values.sum(dtype=np.float64))
            row[f"ref_{side}_tokens"] = int(m.sum())
            if keep_token_logps:
                row[f"ref_{side}_token_logps"] = values.astype(np.float32).tolist()
        rows.append(row)
    return rows


def score(plan: ScorePlan, scorer, score_cfg: ScoreConfig, *, progress=True) -> int:
    """Score ``plan.chunks``; each chunk becomes one shard of complete rows. Returns the tokens scored."""
    bar = tqdm(total=2 * plan.pending, desc="stage one: scoring", unit="seq", disable=not progress)
    start = time.perf_counter()
    seen = {"tokens": 0}

    def on_batch(sequences: int, tokens: int) -> None:
        seen["tokens"] += tokens
        bar.update(sequences)
        bar.set_postfix(tok_s=f"{seen['tokens'] / max(time.perf_counter() - start, 1e-9):.0f}")

    with plan.store.writer(rows_per_shard=score_cfg.rows_per_shard) as writer, preemption.graceful_stop():
        for done, chunk in enumerate(plan.chunks):
            if preemption.requested():
                _stop_for_preemption(plan, done)
            batch = plan.dataset.select(chunk).to_dict()
            seqs = batch["chosen_input_ids"] + batch["rejected_input_ids"]
            masks = batch["chosen_mask"] + batch["rejected_mask"]
            logps = scorer.token_logps(seqs, masks, on_batch)
            writer.add_many(_rows_for(batch, logps, score_cfg.save_token_logps))
            writer.flush()  # one chunk, one shard
    bar.close()
    return seen["tokens"]


def _stop_for_preemption(plan: ScorePlan, done: int) -> None:
    """Every chunk before ``done`` is a committed shard: say so and stop (the CLI exits 75)."""
    name = preemption.signal_name() or "a preemption signal"
    kept = sum(len(c) for c in plan.chunks[:done])
    message = (f"{name} after {done} of {len(plan.chunks)} chunk(s): {kept} newly scored example(s) are in "
               f"{plan.store.root}; rerun the same command to score the other {plan.pending - kept}")
    log(f"stage one: {message}")
    raise preemption.Preempted(message)


def run_score(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, vllm_options=None,
              *, progress=True, list_role: str = "train") -> ScoreResult:
    """Score what the store lacks, then record the example list (``list_role``: ``train`` or ``heldout``)."""
    t0 = time.perf_counter()
    plan = setup(model_cfg, data_cfg, score_cfg, vllm_options=vllm_options, progress=progress)
    total = len(plan.dataset)
    tokens = 0
    other = total - plan.reused - plan.pending
    elsewhere = f" ({other} belong to other parts of the split)" if other else ""
    if not plan.chunks:
        log(f"stage one: {plan.reused} of {total} examples of '{plan.list_name}' are already in "
            f"{plan.store.root}{elsewhere}; nothing to score")
    else:
        log(f"stage one: {plan.reused} examples reused from the store, {plan.pending} to score "
            f"with the {score_cfg.backend} backend{elsewhere}")
        if score_cfg.backend == "vllm":
            scorer = VLLMAdapter(model_cfg, score_cfg, vllm_options, data_cfg.seed)
        else:
            scorer = HFScorer(model_cfg, plan.tokenizer, score_cfg.batch_size)
        try:
            tokens = score(plan, scorer, score_cfg, progress=progress)
        finally:
            scorer.close()
    name = plan.store.record_list(plan.list_name, plan.hashes, role=list_role, mixture_sha256=mixture_digest(data_cfg),
                                  rename_if_taken=score_cfg.store_dataset is None)
    return ScoreResult(str(plan.store.root), name, total, plan.pending, plan.reused,
                       time.perf_counter() - t0, tokens, plan.data_stats)

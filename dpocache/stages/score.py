"""Stage one: score a preference dataset with a frozen reference model into a reference store.

Recipe steps: :func:`setup` (tokenizer, data, identity, store, this process's share of the work),
:func:`score` (the units of work: claimed, scored on the device, committed by a background thread) and
:func:`run_score` (both, then the named example list and freeing the model). The split into parts and
chunks is :mod:`dpocache.stages.scoring.plan`; shared work between concurrent writers is
:mod:`dpocache.artifacts.claims`. On SIGTERM/SIGUSR1 the unit in flight is finished and committed, then
:class:`~dpocache.preemption.Preempted` says what was kept; re-running the same command continues.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from dpocache import preemption
from dpocache.artifacts import ReferenceStore
from dpocache.artifacts.claims import Claims
from dpocache.artifacts.identity import library_versions, text_fingerprint, tokenizer_fingerprint, weights_fingerprint
from dpocache.artifacts.shards import BASE_COLUMNS, TOKEN_COLUMNS
from dpocache.config import ConfigError, check, opt
from dpocache.console import log, progress as progress_bar
from dpocache.data import HASH_VERSION, DataConfig, load_preference_data, mixture_digest, prepare_tokenizer
from dpocache.devices import resolve_device
from dpocache.files import dpocache_home
from dpocache.modeling import (
    ModelConfig,
    ModelLoadError,
    check_model_config,
    check_sequence_lengths,
    load_tokenizer,
    local_model_dir,
)
from dpocache.stages.scoring.batches import EXAMPLE_COLUMNS, ChunkData, ReadyScores, scores_from_token_values
from dpocache.stages.scoring.commit import Committer
from dpocache.stages.scoring.hf import HFScorer
from dpocache.stages.scoring.plan import (
    Unit,
    describe_levels,
    part_order,
    plan_chunks,
    plan_token_units,
    split_levels,
    todo_rows,
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
    device: str = opt("auto", "Device of the HF backend's reference model: auto (cuda:LOCAL_RANK under a "
                      "launcher, cuda:0 alone, the CPU without CUDA), cpu, cuda or cuda:N.", group="scoring")
    batch_size: int = opt(8, "Sequences per reference forward pass (sorted by length within a chunk).",
                          group="scoring")
    rows_per_shard: int = opt(1024, "Examples per chunk: a chunk is scored as one set of batches and written as "
                              "one Parquet shard, so a crash or preemption loses at most the chunk in flight and "
                              "a rerun scores the same batches.", group="store")
    save_token_logps: bool = opt(False, "Also store per-token reference log-probs (on a store that holds the "
                                 "examples without them, they are added under the stored sums).", group="store")
    num_shards: int = opt(1, "Split the examples into this many disjoint parts of equal size (within one "
                          "example; dealt in example-hash order; under a multi-process launch each part is dealt "
                          "again between the ranks) ...", group="scoring")
    shard_index: int = opt(0, "... and score only this part (0-based). Run every part with the same data.",
                           group="scoring")

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.rows_per_shard >= 1, "rows_per_shard must be >= 1")
        check(self.num_shards >= 1, "num_shards must be >= 1")
        check(0 <= self.shard_index < self.num_shards, "shard_index must be in [0, num_shards)")
        check(bool(str(self.device).strip()), "device: empty (use auto, cpu, cuda or cuda:N)")


@dataclass
class ScoreResult:
    store: str
    list_name: str
    examples: int      # unique examples of the list
    scored: int        # examples this process scored and committed
    reused: int        # examples of this process's part it did not score (already in the store, or others')
    seconds: float
    tokens: int = 0
    data_stats: dict = field(default_factory=dict)
    part: str = ""     # this process's share ("part 1/4", "rank 0/2"); empty for the whole list
    part_examples: int = 0
    completed: int = 0  # stored examples given per-token values


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


class VLLMAdapter:
    """The vLLM backend behind the HF scorer's interface (masks are applied here, synchronously)."""

    def __init__(self, model_cfg: ModelConfig, score_cfg: ScoreConfig, vllm_options, seed: int):
        from dpocache.stages.vllm_backend import VLLMOptions, VLLMScorer

        # the files the identity hashed (the requested revision's snapshot), in the dtype the identity names
        options = dataclasses.replace(vllm_options or VLLMOptions(),
                                      vllm_dtype=scoring_dtype(model_cfg, score_cfg, vllm_options))
        self.scorer = VLLMScorer(str(reference_model_dir(model_cfg)), options, seed=seed, progress=False)

    def score(self, chunk: ChunkData, keep_tokens: bool, on_batch=None) -> ReadyScores:
        sequences = [chunk.sequence(k).tolist() for k in range(len(chunk.lengths))]
        values = self.scorer.token_logps(sequences)
        if on_batch:
            on_batch(len(sequences), chunk.tokens)
        flat = np.concatenate(values) if values else np.zeros(0)
        return ReadyScores(scores_from_token_values(chunk, flat, keep_tokens))

    def close(self) -> None:
        self.scorer.close()


@dataclass
class ScorePlan:
    tokenizer: object
    dataset: object  # datasets.Dataset of tokenized examples
    list_name: str
    store: ReferenceStore
    units: list[Unit]
    data_stats: dict
    hashes: list[str]       # the ordered example list (with repeats when a source is upsampled)
    part_hashes: list[str]  # this process's examples (all of them without a split)
    part: str = ""
    reused: int = 0         # examples of this part already in the store
    pending: int = 0        # examples of this part to score
    to_complete: int = 0    # stored rows to re-score for per-token values


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
    levels = split_levels(score_cfg.num_shards, score_cfg.shard_index)
    unique = prepared.dataset["hash"][:]  # a list: a datasets Column reads element by element
    index = {h: locs for h, locs in zip(unique, store.locations(unique)) if locs}
    part = [unique[i] for i in part_order(unique, levels)]
    units = plan_chunks(unique, index.keys(), score_cfg.rows_per_shard, levels)
    pending = sum(1 for h in part if h not in index)
    to_complete = 0
    if score_cfg.save_token_logps:
        extra = plan_token_units(unique, index, store.shard_columns, levels)
        rows = {s["path"]: int(s["rows"]) for s in store.shards}
        to_complete = sum(rows[u.shard] for u in extra)
        units += extra
    name = score_cfg.store_dataset or store.free_list_name(prepared.name, mixture_digest(data_cfg))
    return ScorePlan(tokenizer, prepared.dataset, name, store, units, prepared.stats, prepared.hashes, part,
                     describe_levels(levels), len(part) - pending, pending, to_complete)


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


@dataclass
class ScoreStats:
    scored: int = 0      # examples scored and committed
    completed: int = 0   # stored examples given per-token values
    shards: int = 0
    tokens: int = 0
    stopped: bool = False  # a preemption signal stopped the run


def _load(unit: Unit, plan: ScorePlan, guard: threading.Lock, examples) -> ChunkData | None:
    """The unit's examples still to score (None when other writers or earlier runs did them all)."""
    with guard:
        if unit.shard is None:
            rows = todo_rows(unit, plan.store.contains(unit.hashes))
            return ChunkData(examples[rows]) if rows else None
        table = plan.store.read_shard(unit.shard, BASE_COLUMNS)
        locations = plan.store.locations(table.column("hash").to_pylist())
        known: dict[str, bool] = {}

        def has_tokens(rel: str) -> bool:
            if rel not in known:
                known[rel] = set(TOKEN_COLUMNS) <= set(plan.store.shard_columns(rel))
            return known[rel]

        done = all(any(has_tokens(rel) for rel, _ in locs) for locs in locations)
    return None if done else ChunkData(table)


def _work(plan: ScorePlan, scorer, keep_tokens: bool, claims: Claims, committer: Committer,
          guard: threading.Lock, on_batch) -> bool:
    """Score every unit of the plan; units claimed by other writers are waited for (taken over if their
    writer dies). Returns True when a preemption signal stopped the work (the unit in flight is finished)."""
    examples = plan.dataset.select_columns(EXAMPLE_COLUMNS).with_format("arrow")

    def run(unit: Unit) -> None:
        chunk = _load(unit, plan, guard, examples)
        if chunk is None:
            claims.release(unit.key)
            return
        committer.submit(unit, chunk, scorer.score(chunk, keep_tokens or unit.shard is not None, on_batch))

    waiting: list[Unit] = []
    for unit in plan.units:
        if preemption.requested():
            return True
        if claims.claim(unit.key):
            run(unit)
        else:
            waiting.append(unit)
    if waiting:
        log(f"stage one: {len(waiting)} chunk(s) are being scored by other writers of {plan.store.root}; "
            "waiting for them (a chunk whose writer dies is taken over)")
    while waiting:
        if preemption.requested():
            return True
        committer.check()
        still = []
        for unit in waiting:
            if claims.claim(unit.key):
                run(unit)
            else:
                still.append(unit)
        waiting = still
        if waiting:
            time.sleep(WAIT_SECONDS)
    return False


WAIT_SECONDS = 1.0  # poll interval while other writers hold this process's last chunks


def score(plan: ScorePlan, scorer, score_cfg: ScoreConfig, *, progress=True) -> ScoreStats:
    """Score the plan's units; each becomes one shard, committed by a background thread."""
    bar = progress_bar(2 * (plan.pending + plan.to_complete), "stage one: scoring", "seq", enabled=progress)
    start, stats, guard = time.perf_counter(), ScoreStats(), threading.Lock()

    def on_batch(sequences: int, tokens: int) -> None:
        stats.tokens += tokens
        bar.update(sequences)
        bar.set_postfix(tok_s=f"{stats.tokens / max(time.perf_counter() - start, 1e-9):.0f}")

    with Claims(plan.store.root) as claims:
        claims.sweep()
        committer = Committer(plan.store, claims, guard, keep_tokens=score_cfg.save_token_logps)
        try:
            stats.stopped = _work(plan, scorer, score_cfg.save_token_logps, claims, committer, guard, on_batch)
        except BaseException:
            committer.close(raise_errors=False)  # commit what was computed, then report the first error
            raise
        finally:
            bar.close()
        committer.close()
    stats.scored, stats.completed, stats.shards = committer.scored, committer.completed, committer.shards
    return stats


def make_scorer(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, plan: ScorePlan,
                vllm_options=None):
    if score_cfg.backend == "vllm":
        return VLLMAdapter(model_cfg, score_cfg, vllm_options, data_cfg.seed)
    return HFScorer(model_cfg, plan.tokenizer, score_cfg.batch_size, resolve_device(score_cfg.device))


def _announce(plan: ScorePlan, score_cfg: ScoreConfig, total: int) -> None:
    share = f" ({plan.part}: {len(plan.part_hashes)} of the {total} examples)" if plan.part else ""
    if not plan.units:
        log(f"stage one: {plan.reused} of {len(plan.part_hashes)} examples of '{plan.list_name}'{share} are already "
            f"in {plan.store.root}; nothing to score")
        return
    where = f" on {resolve_device(score_cfg.device)}" if score_cfg.backend == "hf" else ""
    extra = f"; {plan.to_complete} stored examples get per-token values" if plan.to_complete else ""
    log(f"stage one: {plan.reused} examples reused from the store, {plan.pending} to score with the "
        f"{score_cfg.backend} backend{where}{share}{extra}")


def _stopped(plan: ScorePlan, stats: ScoreStats) -> preemption.Preempted:
    have = plan.store.hashes()
    left = sum(1 for h in plan.part_hashes if h not in have)
    share = f" of {plan.part}" if plan.part else ""
    return preemption.Preempted(
        f"{preemption.signal_name() or 'a signal'}: stage one stopped after committing the chunk in flight: "
        f"{stats.scored} examples scored by this run are in {plan.store.root} ({stats.shards} shard(s)); "
        f"{left} of the {len(plan.part_hashes)} examples{share} remain. Re-run the same command to continue "
        "(committed chunks are kept; the rest is scored in the same batches)")


def run_score(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, vllm_options=None,
              *, progress=True, list_role: str = "train") -> ScoreResult:
    """Score what the store lacks, then record the example list (``list_role``: ``train`` or ``heldout``)."""
    t0 = time.perf_counter()
    if score_cfg.backend == "hf":
        resolve_device(score_cfg.device)  # a device this machine lacks: refused before any work
    plan = setup(model_cfg, data_cfg, score_cfg, vllm_options=vllm_options, progress=progress)
    stats = ScoreStats()
    try:
        _announce(plan, score_cfg, len(plan.dataset))
        if plan.units:
            with preemption.graceful_stop():
                scorer = make_scorer(model_cfg, data_cfg, score_cfg, plan, vllm_options)
                try:
                    stats = score(plan, scorer, score_cfg, progress=progress)
                finally:
                    scorer.close()
                if stats.stopped:
                    _record(plan, data_cfg, score_cfg, list_role)
                    raise _stopped(plan, stats)
        name = _record(plan, data_cfg, score_cfg, list_role)
    finally:
        plan.store.close()
    return ScoreResult(str(plan.store.root), name, len(plan.dataset), stats.scored,
                       len(plan.part_hashes) - stats.scored, time.perf_counter() - t0, stats.tokens,
                       plan.data_stats, plan.part, len(plan.part_hashes), stats.completed)


def _record(plan: ScorePlan, data_cfg: DataConfig, score_cfg: ScoreConfig, role: str) -> str:
    """Record the example list (a default name already holding another mixture gets a suffix); returns its name."""
    return plan.store.record_list(plan.list_name, plan.hashes, role=role, mixture_sha256=mixture_digest(data_cfg),
                                  rename_if_taken=score_cfg.store_dataset is None)

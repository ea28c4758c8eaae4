"""`dpocache run`: stage one where the store lacks examples, stage two, held-out evaluation, summary.

The two stages meet only here and in the store: stage one returns where it wrote (store path and
example-list names), stage two reads from there. A reference-free loss (simpo) skips stage one
entirely: no reference model is loaded, no store is written, and stage two tokenizes the data itself.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dpocache.config import ConfigError, check, opt, to_dict
from dpocache.console import log
from dpocache.data import DataConfig
from dpocache.files import atomic_write_json
from dpocache.hub import check_hub_access, push_output
from dpocache.losses import REFERENCE_FREE
from dpocache.modeling import ModelConfig
from dpocache.plotting import plot_metrics
from dpocache.stages.score import ScoreConfig, run_score
from dpocache.stages.train import TrainConfig, evaluate, load_examples, run_train
from dpocache.stages.train.distributed import zero_stage
from dpocache.stages.train.examples import examples_from_data


@dataclass
class RunConfig:
    heldout_dataset: str | None = opt(
        None, "Held-out preference data (same formats as --dataset): scored in stage one, then used to "
        "measure the trained policy's reward accuracy and margin against the reference (reference-free "
        "losses: the policy's own preference accuracy and log-prob margin).", group="run")
    eval_batch_size: int = opt(8, "Pairs per forward pass in the held-out evaluation.", group="run")

    def __post_init__(self):
        check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")


def apply_embedded_defaults(model_cfg: ModelConfig, data_cfg: DataConfig, run_cfg: RunConfig):
    """No model or data given: use the embedded SmolLM2-135M-Instruct and preference dataset."""
    if model_cfg.model_name_or_path is None:
        from dpocache import defaults

        model_cfg.model_name_or_path = str(defaults.default_model_path())
        log(f"model: embedded default {defaults.DEFAULT_MODEL_NAME} ({model_cfg.model_name_or_path})")
    if data_cfg.dataset is None and not data_cfg.mixer_list:
        from dpocache import defaults

        files = defaults.default_dataset_files()
        data_cfg.dataset = str(files["train"])
        if run_cfg.heldout_dataset is None:
            run_cfg.heldout_dataset = str(files["heldout"])
        log(f"data: embedded default preference set ({data_cfg.dataset})")


def _barrier() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


@dataclass
class StageOne:
    """What stage one left for stage two (or why it did not run)."""

    store: str | None
    list_name: str | None
    heldout_list: str | None
    examples: int = 0
    scored: int = 0
    reused: int = 0
    seconds: float = 0.0
    skip_reason: str | None = None  # why stage one was skipped; None when it scored something


def heldout_data(data_cfg: DataConfig, run_cfg: RunConfig) -> DataConfig | None:
    """The held-out data as a one-source DataConfig with the training data's settings."""
    if not run_cfg.heldout_dataset:
        return None
    return dataclasses.replace(data_cfg, dataset=run_cfg.heldout_dataset, mixer_list=[],
                               mixer_list_splits=data_cfg.mixer_list_splits[:1], max_train_samples=None)


def stage_one(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, held_data: DataConfig | None,
              vllm_options, *, progress=True) -> StageOne:
    """Score what the store lacks of the training and held-out data."""
    first = run_score(model_cfg, data_cfg, score_cfg, vllm_options, progress=progress)
    heldout = None
    if held_data is not None:
        held_score = dataclasses.replace(score_cfg, store=first.store, store_dataset=f"{first.list_name}-heldout")
        heldout = run_score(model_cfg, held_data, held_score, vllm_options, progress=progress)
    scored = first.scored + (heldout.scored if heldout else 0)
    _barrier()  # under a multi-process launch, every rank's part must be in the store before training
    return StageOne(first.store, first.list_name, heldout.list_name if heldout else None, first.examples, scored,
                    first.reused + (heldout.reused if heldout else 0),
                    first.seconds + (heldout.seconds if heldout else 0),
                    None if scored else "every example already scored")


def skip_stage_one(train_cfg: TrainConfig, score_cfg: ScoreConfig) -> StageOne:
    """A reference-free loss needs no reference: no reference model is loaded and no store is written."""
    reason = f"the {train_cfg.loss_type} loss is reference-free: no reference model, no store"
    log(f"stage one: skipped ({reason})" + ("; --store is not used" if score_cfg.store else ""))
    return StageOne(None, None, None, skip_reason=reason)


def run(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, train_cfg: TrainConfig,
        run_cfg: RunConfig, vllm_options=None, *, progress=True) -> dict:
    t_start = time.perf_counter()
    apply_embedded_defaults(model_cfg, data_cfg, run_cfg)
    check_hub_access(train_cfg)  # --push_to_hub without a token: fail before any work
    held_data = heldout_data(data_cfg, run_cfg)
    if train_cfg.loss_type in REFERENCE_FREE:
        first = skip_stage_one(train_cfg, score_cfg)
        train_cfg = dataclasses.replace(train_cfg, store=None, store_dataset=None)
    else:
        first = stage_one(model_cfg, data_cfg, score_cfg, held_data, vllm_options, progress=progress)
        train_cfg = dataclasses.replace(train_cfg, store=first.store, store_dataset=first.list_name)
    t_train = time.perf_counter()
    state = run_train(model_cfg, train_cfg, data_cfg=data_cfg if first.store is None else None, push=False,
                      progress=progress)
    train_seconds = time.perf_counter() - t_train

    summary = {
        "output_dir": str(Path(train_cfg.output_dir).resolve()),
        "store": first.store,
        "store_dataset": state.list_name,
        "stage_one_skipped": first.skip_reason is not None,
        "stage_one_skip_reason": first.skip_reason,
        "examples": first.examples if first.store is not None else len(set(state.examples.hashes)),
        "examples_scored": first.scored,
        "examples_reused": first.reused,
        "score_seconds": round(first.seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "train_steps": state.total_steps,
        "final_metrics": state.history[-1] if state.history else {},
        "heldout_examples": None,
        "heldout_reward_accuracy": None,
        "heldout_reward_margin": None,
        "heldout_policy_preference_accuracy": None,
        "heldout_policy_logp_margin": None,
    }
    is_main = state.accelerator.is_main_process
    # ZeRO-3 keeps parameters partitioned: every rank takes part in the held-out forwards (rank 0 records)
    every_rank = zero_stage(state.accelerator) == 3
    if held_data is not None and (is_main or every_rank):
        held_metrics = heldout_metrics(state, first, held_data, train_cfg, run_cfg, progress=progress)
        if is_main:
            summary.update(held_metrics)
    summary["config"] = to_dict(model_cfg, data_cfg, score_cfg, train_cfg, run_cfg)
    if is_main:
        try:
            summary["plots"] = [str(p) for p in plot_metrics(train_cfg.output_dir, summary=summary)]
        except ConfigError as exc:
            log(f"plots skipped: {exc}")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    if is_main:
        atomic_write_json(Path(train_cfg.output_dir) / "summary.json", summary)
        log(format_summary(summary))
        if train_cfg.push_to_hub:  # last: everything is saved locally before the network is needed
            push_output(train_cfg)
    return summary


def heldout_metrics(state, first: StageOne, held_data: DataConfig, train_cfg: TrainConfig, run_cfg: RunConfig,
                    *, progress=True) -> dict:
    """Measure the trained policy on the held-out pairs (rank 0 alone: no DDP collectives; every rank under
    ZeRO-3, whose forwards gather parameters).

    Against the stored reference: reward accuracy and margin. Reference-free (no store): the policy's
    own preference accuracy (chosen has the higher average log-prob) and average log-prob margin.
    """
    if first.store is None:
        _, held = examples_from_data(held_data, state.tokenizer, progress=progress)
    else:
        held = load_examples(state.store, state.store.get_list(first.heldout_list), allow_missing=False)
    policy = state.accelerator.unwrap_model(state.logp_model)
    metrics = evaluate(policy, held, state.tokenizer.pad_token_id, loss_type=train_cfg.loss_type,
                       beta=train_cfg.beta, batch_size=run_cfg.eval_batch_size, device=state.accelerator.device)
    return {"heldout_examples": len(held), **{f"heldout_{k}": v for k, v in metrics.items()}}


def format_summary(s: dict) -> str:
    fm = s.get("final_metrics") or {}
    if s["store"] is None:
        store_line = f"none (list '{s['store_dataset']}' tokenized from the data)"
    else:
        store_line = f"{s['store']}  (list '{s['store_dataset']}')"
    if s["stage_one_skipped"]:
        stage_one_line = f"skipped ({s.get('stage_one_skip_reason') or 'every example already scored'})"
    else:
        stage_one_line = "ran"
    lines = [
        "",
        "== dpocache run: summary ==",
        f"store:           {store_line}",
        f"stage one:       {stage_one_line}; "
        f"{s['examples_scored']} scored, {s['examples_reused']} reused, {s['score_seconds']} s",
        f"stage two:       {s['train_steps']} steps in {s['train_seconds']} s",
        f"model:           {s['output_dir']}",
        f"metrics:         {Path(s['output_dir']) / 'metrics.jsonl'}",
        "final metrics:   " + ", ".join(f"{k}={v:.4f}" for k, v in fm.items()
                                        if k in ("train_loss", "rewards/accuracy", "rewards/margin")),
    ]
    if s.get("heldout_reward_accuracy") is not None:
        lines.append(f"held-out:        reward accuracy {s['heldout_reward_accuracy']:.3f}, "
                     f"reward margin {s['heldout_reward_margin']:.3f} ({s['heldout_examples']} pairs)")
    if s.get("heldout_policy_preference_accuracy") is not None:
        lines.append(f"held-out:        policy preference accuracy {s['heldout_policy_preference_accuracy']:.3f}, "
                     f"average log-prob margin {s['heldout_policy_logp_margin']:.3f} ({s['heldout_examples']} pairs; "
                     "no reference)")
    lines.append(f"total time:      {s['total_seconds']} s")
    return "\n".join(lines)

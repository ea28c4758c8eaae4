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

from dpocache.config import ConfigError, opt, to_dict
from dpocache.console import log
from dpocache.data import DataConfig
from dpocache.hub import check_hub_access, push_output
from dpocache.losses import LossConfig
from dpocache.modeling import ModelConfig
from dpocache.plotting import plot_metrics
from dpocache.devices import release_memory
from dpocache.stages.score import ScoreConfig, run_score
from dpocache.stages.train import TrainConfig, run_train
from dpocache.stages.train.outputs import train_summary, write_summary


@dataclass
class RunConfig:
    heldout_dataset: str | None = opt(
        None, "Held-out preference data (same formats as --dataset): scored in stage one, then used to "
        "measure the trained policy's reward accuracy and margin against the reference (reference-free "
        "losses: the policy's own preference accuracy and log-prob margin).", group="run")


def apply_embedded_defaults(model_cfg: ModelConfig, data_cfg: DataConfig, run_cfg: RunConfig,
                            train_cfg: TrainConfig | None = None, loss_cfg=None):
    """No model or data given: use the embedded SmolLM2-135M-Instruct and preference dataset. With neither
    given (the embedded demo), also the demo's own training values where the command line left them out:
    ``dpo_norm`` with beta 5 and learning rate 2e-5 (the library defaults are those of a real run)."""
    from dpocache import defaults

    demo = model_cfg.model_name_or_path is None and data_cfg.dataset is None and not data_cfg.mixer_list
    if model_cfg.model_name_or_path is None:
        model_cfg.model_name_or_path = str(defaults.default_model_path())
        log(f"model: embedded default {defaults.DEFAULT_MODEL_NAME} ({model_cfg.model_name_or_path})")
    if data_cfg.dataset is None and not data_cfg.mixer_list:
        files = defaults.default_dataset_files()
        data_cfg.dataset = str(files["train"])
        if run_cfg.heldout_dataset is None:
            run_cfg.heldout_dataset = str(files["heldout"])
        log(f"data: embedded default preference set ({data_cfg.dataset})")
    if demo:
        chosen = apply_demo_training_values(train_cfg, loss_cfg)
        if chosen:
            log(f"embedded demo: {', '.join(chosen)} (the demo's own values; --learning_rate, --loss_type and "
                "--beta set others)")


def apply_demo_training_values(train_cfg: TrainConfig | None, loss_cfg) -> list[str]:
    """The embedded demo's learning rate, loss and beta, each only where the command line left it out;
    returns what was set."""
    from dpocache import defaults

    chosen = []
    if train_cfg is not None and getattr(train_cfg, "_learning_rate_default", False):
        train_cfg.learning_rate = defaults.DEMO_LEARNING_RATE
        train_cfg._learning_rate_default = False
        chosen.append(f"learning rate {defaults.DEMO_LEARNING_RATE:g}")
    if loss_cfg is not None and loss_cfg.loss_type == defaults.DEMO_LOSS_TYPE and loss_cfg.beta_is_default:
        loss_cfg.beta = defaults.DEMO_BETA
        loss_cfg._beta_default = False
        chosen.append(f"{defaults.DEMO_LOSS_TYPE} with beta {defaults.DEMO_BETA:g}")
    return chosen


def _sum_over_ranks(values: list[int]) -> list[int]:
    """Element-wise sums over the ranks of a multi-process launch (the values themselves when alone). Every
    rank calls it once its part of stage one is committed, so it is also the barrier before stage two."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return list(values)
    import torch
    from accelerate import PartialState
    from accelerate.utils import reduce

    state = PartialState(cpu=not torch.cuda.is_available())
    return reduce(torch.tensor(values, dtype=torch.int64, device=state.device), reduction="sum").tolist()


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
    """Score what the store lacks of the training and held-out data. Under a multi-process launch each rank
    scores its part; the counts returned are totals over the ranks."""
    first = run_score(model_cfg, data_cfg, score_cfg, vllm_options, progress=progress)
    heldout = None
    if held_data is not None:
        held_score = dataclasses.replace(score_cfg, store=first.store, store_dataset=f"{first.list_name}-heldout")
        heldout = run_score(model_cfg, held_data, held_score, vllm_options, progress=progress, list_role="heldout")
    runs = [first] + ([heldout] if heldout else [])
    scored, completed = _sum_over_ranks([sum(r.scored for r in runs), sum(r.completed for r in runs)])
    examples = sum(r.examples for r in runs)
    seconds = sum(r.seconds for r in runs)
    skip = None if scored or completed else "every example already scored"
    return StageOne(first.store, first.list_name, heldout.list_name if heldout else None, first.examples, scored,
                    examples - scored, seconds, skip)


def skip_stage_one(loss_cfg: LossConfig, score_cfg: ScoreConfig) -> StageOne:
    """A reference-free loss needs no reference: no reference model is loaded and no store is written."""
    reason = f"the {loss_cfg.loss_type} loss is reference-free: no reference model, no store"
    log(f"stage one: skipped ({reason})" + ("; --store is not used" if score_cfg.store else ""))
    return StageOne(None, None, None, skip_reason=reason)


def run(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, train_cfg: TrainConfig,
        run_cfg: RunConfig, vllm_options=None, *, loss_cfg: LossConfig | None = None, progress=True) -> dict:
    t_start = time.perf_counter()
    loss_cfg = loss_cfg or LossConfig()
    apply_embedded_defaults(model_cfg, data_cfg, run_cfg, train_cfg, loss_cfg)
    check_hub_access(train_cfg)  # --push_to_hub without a token: fail before any work
    held_data = heldout_data(data_cfg, run_cfg)
    if loss_cfg.reference_free:
        first = skip_stage_one(loss_cfg, score_cfg)
        train_cfg = dataclasses.replace(train_cfg, store=None, store_dataset=None, heldout_store_dataset=None)
    else:
        first = stage_one(model_cfg, data_cfg, score_cfg, held_data, vllm_options, progress=progress)
        train_cfg = dataclasses.replace(train_cfg, store=first.store, store_dataset=first.list_name,
                                        heldout_store_dataset=first.heldout_list)
    release_memory()  # the reference's accelerator memory goes back before the policy loads
    recipe = run_train(model_cfg, train_cfg, data_cfg=data_cfg if first.store is None else None, loss_cfg=loss_cfg,
                       heldout_data=held_data if first.store is None else None, push=False, show_progress=progress,
                       summarize=False)
    summary = {
        "stage_one_skipped": first.skip_reason is not None,
        "stage_one_skip_reason": first.skip_reason,
        "examples_scored": first.scored,
        "examples_reused": first.reused,
        "score_seconds": round(first.seconds, 2),
    }
    is_main = recipe.accelerator.is_main_process
    summary["config"] = to_dict(model_cfg, data_cfg, score_cfg, train_cfg, loss_cfg, run_cfg)
    summary = {**train_summary(recipe), **summary}  # the plots draw its held-out figures
    if is_main:
        try:
            summary["plots"] = [str(p) for p in plot_metrics(train_cfg.output_dir, summary=summary)]
        except ConfigError as exc:
            log(f"plots skipped: {exc}")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    if is_main:
        summary = write_summary(recipe, summary)
        log(format_summary(summary))
        if train_cfg.push_to_hub:  # last: everything is saved locally before the network is needed
            push_output(train_cfg, loss_cfg)
    return summary


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

"""`dpocache run`: stage one where the store lacks examples, stage two, held-out evaluation, summary.

The two stages meet only here and in the store: stage one returns where it wrote (store path and
example-list names), stage two reads from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dpocache.config import ConfigError, check, opt, to_dict
from dpocache.plotting import plot_metrics
from dpocache.data import DataConfig
from dpocache.modeling import ModelConfig
from dpocache.stages.score import ScoreConfig, run_score
from dpocache.stages.train import TrainConfig, evaluate, load_examples, run_train


@dataclass
class RunConfig:
    heldout_dataset: str | None = opt(
        None, "Held-out preference data (same formats as --dataset): scored in stage one, then used to "
        "measure the trained policy's reward accuracy and margin against the reference.", group="run")
    eval_batch_size: int = opt(8, "Pairs per forward pass in the held-out evaluation.", group="run")

    def __post_init__(self):
        check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")


def apply_embedded_defaults(model_cfg: ModelConfig, data_cfg: DataConfig, run_cfg: RunConfig, *, log=print):
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


def _atomic_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run(model_cfg: ModelConfig, data_cfg: DataConfig, score_cfg: ScoreConfig, train_cfg: TrainConfig,
        run_cfg: RunConfig, vllm_options=None, *, progress=True, log=print) -> dict:
    t_start = time.perf_counter()
    apply_embedded_defaults(model_cfg, data_cfg, run_cfg, log=log)

    first = run_score(model_cfg, data_cfg, score_cfg, vllm_options, progress=progress, log=log)
    heldout = None
    if run_cfg.heldout_dataset:
        held_data = dataclasses.replace(data_cfg, dataset=run_cfg.heldout_dataset, mixer_list=[],
                                        mixer_list_splits=data_cfg.mixer_list_splits[:1],
                                        max_train_samples=None)
        held_score = dataclasses.replace(score_cfg, store=first.store,
                                         store_dataset=f"{first.list_name}-heldout")
        heldout = run_score(model_cfg, held_data, held_score, vllm_options, progress=progress, log=log)
    skipped = first.scored == 0 and (heldout is None or heldout.scored == 0)
    _barrier()  # under a multi-process launch, every rank's part must be in the store before training

    train_cfg = dataclasses.replace(train_cfg, store=first.store, store_dataset=first.list_name)
    t_train = time.perf_counter()
    state = run_train(model_cfg, train_cfg, progress=progress, log=log)
    train_seconds = time.perf_counter() - t_train

    summary = {
        "output_dir": str(Path(train_cfg.output_dir).resolve()),
        "store": first.store,
        "store_dataset": first.list_name,
        "stage_one_skipped": skipped,
        "examples": first.examples,
        "examples_scored": first.scored + (heldout.scored if heldout else 0),
        "examples_reused": first.reused + (heldout.reused if heldout else 0),
        "score_seconds": round(first.seconds + (heldout.seconds if heldout else 0), 2),
        "train_seconds": round(train_seconds, 2),
        "train_steps": state.total_steps,
        "final_metrics": state.history[-1] if state.history else {},
        "heldout_examples": None,
        "heldout_reward_accuracy": None,
        "heldout_reward_margin": None,
    }
    if heldout is not None and state.accelerator.is_main_process:
        held = load_examples(state.store, state.store.get_list(heldout.list_name), allow_missing=False)
        policy = state.accelerator.unwrap_model(state.logp_model)  # rank 0 alone: no DDP collectives
        metrics = evaluate(policy, held, state.tokenizer.pad_token_id, loss_type=train_cfg.loss_type,
                           beta=train_cfg.beta, batch_size=run_cfg.eval_batch_size,
                           device=state.accelerator.device)
        summary.update(heldout_examples=len(held), heldout_reward_accuracy=metrics["reward_accuracy"],
                       heldout_reward_margin=metrics["reward_margin"])
    if state.accelerator.is_main_process:
        try:
            summary["plots"] = [str(p) for p in plot_metrics(train_cfg.output_dir)]
        except ConfigError as exc:
            log(f"plots skipped: {exc}")
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    summary["config"] = to_dict(model_cfg, data_cfg, score_cfg, train_cfg, run_cfg)
    if state.accelerator.is_main_process:
        _atomic_json(Path(train_cfg.output_dir) / "summary.json", summary)
        log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    fm = s.get("final_metrics") or {}
    lines = [
        "",
        "== dpocache run: summary ==",
        f"store:           {s['store']}  (list '{s['store_dataset']}')",
        f"stage one:       {'skipped (every example already scored)' if s['stage_one_skipped'] else 'ran'}; "
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
    lines.append(f"total time:      {s['total_seconds']} s")
    return "\n".join(lines)

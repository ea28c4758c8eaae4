"""Stage two: train the policy with a DPO-family loss against reference values read from a store.

Only the policy model is loaded. Recipe steps: :func:`setup` (store, examples, policy, optimizer,
schedule), :func:`train` (the loop) and :func:`save`; :func:`evaluate` measures reward accuracy and
margin of a policy on a list of stored examples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpocache.artifacts import ReferenceStore
from dpocache.config import check
from dpocache.console import log
from dpocache.data import DataConfig
from dpocache.hub import check_hub_access, push_output
from dpocache.logprobs import TokenLogps, supports_selected_path
from dpocache.losses import LossConfig, LossInputs, build_loss, check_requirements
from dpocache.modeling import (
    ModelConfig,
    check_model_config,
    check_sequence_lengths,
    load_causal_lm,
    resize_for_tokenizer,
)
from dpocache.stages.train.batching import epoch_order, micro_batches
from dpocache.stages.train.checkpoint import (
    begin_checkpoint,
    finish_checkpoint,
    load_checkpoint,
    load_optimizer_partition,
    resolve_resume,
    save_rank_state,
    staging_dir,
)
from dpocache.stages.train.config import TrainConfig
from dpocache.stages.train.distributed import (
    configure_deepspeed,
    engine_name,
    full_state_dict,
    is_deepspeed,
    make_accelerator,
    zero_stage,
)
from dpocache.stages.train.examples import (
    Examples,
    data_fingerprint,
    evaluate,
    forward_batch,
    load_examples,
    load_training_data,
)
from dpocache.stages.train.extras import (
    add_lora,
    apply_liger_kernel,
    clip_grad,
    disable_dropout,
    enable_gradient_checkpointing,
    heap_trimmer,
    limit_allocator_retention,
    reduce_metrics,
    start_trackers,
)
from dpocache.stages.train.model_card import write_model_card
from dpocache.stages.train.packing import require_packing
from dpocache.stages.train.tracking import JsonlWriter, MetricAverager, format_line

__all__ = ["TrainConfig", "TrainState", "setup", "train", "save", "evaluate", "load_examples", "run_train"]


@dataclass
class TrainState:
    model_cfg: ModelConfig
    cfg: TrainConfig
    store: ReferenceStore | None  # None: a reference-free loss trained from the data
    list_name: str
    examples: Examples
    tokenizer: object
    model: object
    logp_model: object
    optimizer: object
    scheduler: object
    accelerator: object
    total_steps: int
    steps_per_epoch: int
    settings: dict = field(default_factory=dict)
    start_step: int = 0
    history: list = field(default_factory=list)
    loss_cfg: LossConfig = field(default_factory=LossConfig)
    loss: object = None  # the PreferenceLoss of loss_cfg


def setup(model_cfg: ModelConfig, cfg: TrainConfig, *, data_cfg: DataConfig | None = None,
          loss_cfg: LossConfig | None = None) -> TrainState:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    check(model_cfg.model_name_or_path is not None, "train needs --model_name_or_path (the policy)")
    loss_cfg = loss_cfg or LossConfig()
    req = loss_cfg.requirements
    check(not (req.policy_tokens or req.policy_log_sum_sq), "--ld_alpha and --use_weighting need per-token values "
          "that this training loop does not compute")
    if not torch.cuda.is_available():
        limit_allocator_retention()
    accelerator = make_accelerator(cfg)
    sharded = is_deepspeed(accelerator)
    check(not (cfg.use_lora and cfg.merge_lora and zero_stage(accelerator) == 3),
          "--merge_lora is not supported under DeepSpeed ZeRO-3 (parameters are partitioned): save the adapter "
          "and merge it afterwards, or use ZeRO-2")
    set_seed(cfg.seed)
    config = check_model_config(model_cfg)
    store, name, examples, tokenizer = load_training_data(model_cfg, cfg, data_cfg, loss_cfg)
    check_requirements(req, store=None if store is None else str(store.root), store_token_logps=False,
                       loss_type=loss_cfg.loss_type)
    check_sequence_lengths(config, int(examples.lengths.max()), f"example list '{name}'")
    model = load_causal_lm(model_cfg, train=True)
    resize_for_tokenizer(model, tokenizer)
    if cfg.disable_dropout and (zeroed := disable_dropout(model)):
        log(f"stage two: dropout off ({zeroed} non-zero rate(s) set to 0; --disable_dropout false keeps them)")
    if cfg.use_liger_kernel:
        apply_liger_kernel(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.activation_memory_budget)
    if cfg.use_lora:
        model = add_lora(model, cfg)
    # the probes (output head, packing) run after prepare: under ZeRO-3 the weights are partitioned until the
    # engine's hooks gather them
    logp_model = TokenLogps(model, selected=False, chunk=cfg.logps_chunk_size, keep_mb=cfg.logps_keep_mb,
                            load_balancing=loss_cfg.load_balancing_loss)
    world = accelerator.num_processes
    micro_per_epoch = math.ceil(len(examples) / (cfg.per_device_train_batch_size * world))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps))
    total = cfg.max_train_steps or steps_per_epoch * cfg.num_epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=cfg.fused_optimizer or None)
    scheduler = get_scheduler(cfg.lr_scheduler_type if cfg.lr_scheduler_type != "constant"
                              else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    settings = resume_settings(cfg, store, name, examples, accelerator, total)
    settings["loss"] = dataclasses.asdict(loss_cfg)
    start_step = 0
    ckpt = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if ckpt is not None:
        start_step = load_checkpoint(ckpt, model=model, optimizer=None if sharded else optimizer,
                                     scheduler=scheduler, settings=settings,
                                     rank=accelerator.process_index)["step"]
    elif cfg.resume_from_checkpoint == "auto":
        log(f"stage two: no complete checkpoint in {cfg.output_dir}; starting from scratch")
    if sharded:
        configure_deepspeed(accelerator, cfg, model.config)
    adamw = "fused" if optimizer.defaults.get("fused") else "for-each"
    logp_model, optimizer = accelerator.prepare(logp_model, optimizer)
    if cfg.fused_logps:
        with torch.no_grad():
            accelerator.unwrap_model(logp_model).selected = supports_selected_path(model)
    if cfg.packing:
        require_packing(accelerator.unwrap_model(logp_model))
    path = "chunked, trainable positions only" if accelerator.unwrap_model(logp_model).selected else "full logits"
    log(f"stage two: engine {engine_name(accelerator)} x {accelerator.num_processes} process(es); log-probs: {path}; "
        f"AdamW: {adamw}")
    if ckpt is not None:
        if sharded:
            load_optimizer_partition(ckpt / f"optimizer_rank{accelerator.process_index:05d}.safetensors", optimizer,
                                     scheduler)
        log(f"stage two: resumed from {ckpt} at step {start_step}")
    if cfg.with_tracking:
        start_trackers(accelerator, model_cfg, cfg)
    loss = build_loss(loss_cfg, reduce_mean=lambda t: accelerator.reduce(t, "mean"))
    return TrainState(model_cfg, cfg, store, name, examples, tokenizer, model, logp_model, optimizer,
                      scheduler, accelerator, total, steps_per_epoch, settings, start_step, loss_cfg=loss_cfg,
                      loss=loss)


RESUME_FIELDS = ("learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler_type", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "seed", "max_grad_norm", "group_by_length", "use_lora", "lora_rank",
                 "packing")


def resume_settings(cfg: TrainConfig, store: ReferenceStore | None, list_name: str, examples: Examples, acc,
                    total: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    settings = {k: getattr(cfg, k) for k in RESUME_FIELDS}
    settings.update(engine=engine_name(acc), store_identity=data_fingerprint(store, examples),
                    store_dataset=list_name, examples=len(examples), num_processes=acc.num_processes,
                    total_steps=total)
    return settings


def _micro_batches(state: TrainState, skip: int = 0):
    """Endless (epoch, indices) micro-batches; the first ``skip`` are passed over (resume)."""
    cfg, acc = state.cfg, state.accelerator
    epoch, produced = 0, 0
    lengths = state.examples.lengths
    while True:
        step_batch = cfg.per_device_train_batch_size * acc.num_processes * cfg.gradient_accumulation_steps
        order = epoch_order(lengths, step_batch, cfg.seed, epoch,
                            group_by_length=cfg.group_by_length)
        for idx in micro_batches(order, cfg.per_device_train_batch_size, acc.process_index, acc.num_processes):
            produced += 1
            if produced > skip:
                yield epoch, idx
        epoch += 1


def _checkpoint(state: TrainState, step: int) -> None:
    """Every rank takes part: ZeRO-3 gathers the weights, each rank writes its RNG (and ZeRO optimizer
    partition), then rank 0 completes and renames the checkpoint."""
    from accelerate.utils import broadcast_object_list

    acc, cfg = state.accelerator, state.cfg
    weights = full_state_dict(acc, state.logp_model)
    owner = broadcast_object_list([os.getpid()])[0] if acc.num_processes > 1 else os.getpid()
    if acc.is_main_process:
        tmp = begin_checkpoint(cfg.output_dir, step, owner)
    acc.wait_for_everyone()
    tmp = staging_dir(cfg.output_dir, step, owner)
    sharded = is_deepspeed(acc)
    save_rank_state(tmp, acc.process_index, sharded_optimizer=state.optimizer if sharded else None)
    acc.wait_for_everyone()
    if acc.is_main_process:
        finish_checkpoint(cfg.output_dir, tmp, step, model_state=weights,
                          optimizer=None if sharded else state.optimizer, scheduler=state.scheduler,
                          settings=state.settings, keep_last=cfg.keep_last_n_checkpoints)
    acc.wait_for_everyone()


def train(state: TrainState, *, progress=True) -> list[dict]:
    cfg, acc = state.cfg, state.accelerator
    is_main = acc.is_main_process
    out_dir = Path(cfg.output_dir)
    start = state.start_step
    writer = JsonlWriter(out_dir / "metrics.jsonl", keep_until_step=start) if is_main else None
    averager = MetricAverager()
    micro = _micro_batches(state, skip=start * cfg.gradient_accumulation_steps)
    micro_per_epoch = state.steps_per_epoch * cfg.gradient_accumulation_steps
    bar = tqdm(total=state.total_steps, initial=start, desc="stage two: training", unit="step",
               disable=not (progress and is_main))
    tokens, t0 = 0, time.perf_counter()
    seen = start * cfg.gradient_accumulation_steps
    state.logp_model.train()
    trim = heap_trimmer() if cfg.release_host_memory and acc.device.type == "cpu" else None
    for step in range(start + 1, state.total_steps + 1):
        grad_norm = None
        for _ in range(cfg.gradient_accumulation_steps):
            epoch, idx = next(micro)
            # accelerate's accumulate(): no gradient sync and no optimizer step until the last
            # micro-batch; backward() divides the loss by the accumulation steps (DeepSpeed: the engine).
            with acc.accumulate(state.logp_model):
                policy, reference, ntok, aux = forward_batch(state.logp_model, state.examples, idx,
                                                             state.tokenizer.pad_token_id, acc.device,
                                                             packing=cfg.packing)
                out = state.loss(LossInputs(policy, reference, aux_loss=aux))
                acc.backward(out.loss)
                if acc.sync_gradients:
                    grad_norm = clip_grad(acc, state.logp_model, cfg.max_grad_norm)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                if trim is not None and acc.sync_gradients:
                    trim()
            averager.add({k: float(v) for k, v in out.metrics.items()})
            tokens += ntok
            seen += 1
        if grad_norm is not None:
            averager.add({"grad_norm": grad_norm})
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == state.total_steps:
            metrics = reduce_metrics(acc, averager.pop())
            elapsed = time.perf_counter() - t0
            metrics.update({"training_step": step, "learning_rate": lr, "epoch": seen / micro_per_epoch,
                            "perf/tokens_per_second": tokens * acc.num_processes / max(elapsed, 1e-9)})
            state.history.append(metrics)
            if cfg.with_tracking:
                acc.log(metrics, step=step)
            if writer:
                writer.write(metrics)
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}")
                (tqdm.write if progress else log)(format_line(metrics))
        at_epoch_end = cfg.checkpoint_at_epoch_end and step % state.steps_per_epoch == 0
        periodic = cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
        if (at_epoch_end or periodic) and step < state.total_steps:
            _checkpoint(state, step)
    bar.close()
    if writer:
        writer.close()
    if cfg.with_tracking:
        acc.end_training()
    return state.history


def save(state: TrainState) -> Path:
    """Final model (safetensors) and tokenizer (with its chat template) into ``output_dir``."""
    acc = state.accelerator
    out = Path(state.cfg.output_dir)
    acc.wait_for_everyone()
    gathered = full_state_dict(acc, state.logp_model) if zero_stage(acc) == 3 else None  # collective
    if acc.is_main_process:
        model = acc.unwrap_model(state.logp_model).model
        out.mkdir(parents=True, exist_ok=True)
        if state.cfg.use_lora and state.cfg.merge_lora:
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True, state_dict=gathered)
        state.tokenizer.save_pretrained(out)
        write_model_card(out, base_model=state.model_cfg.model_name_or_path, train_cfg=state.cfg,
                         loss_cfg=state.loss_cfg,
                         store_root=getattr(state.store, "root", None),
                         store_identity=getattr(state.store, "identity", None),
                         list_name=state.list_name, examples=len(state.examples),
                         final_metrics=state.history[-1] if state.history else {})
        log(f"stage two: model, tokenizer and model card saved to {out}")
    acc.wait_for_everyone()
    return out


def run_train(model_cfg: ModelConfig, cfg: TrainConfig, *, data_cfg: DataConfig | None = None,
              loss_cfg: LossConfig | None = None, push: bool = True, progress=True) -> TrainState:
    """Setup, train, save; then (``--push_to_hub``, rank 0, unless ``push`` is False) upload the model.

    ``data_cfg`` is the data a reference-free loss trains from when there is no store.
    """
    check_hub_access(cfg)  # no token: fail before any work
    state = setup(model_cfg, cfg, data_cfg=data_cfg, loss_cfg=loss_cfg)
    source = state.store.root if state.store is not None else "the data (no store)"
    log(f"stage two: {len(state.examples)} examples from list '{state.list_name}' of {source}; "
        f"{state.total_steps} optimizer steps, {state.loss_cfg.describe()}")
    train(state, progress=progress)
    save(state)
    if push and cfg.push_to_hub and state.accelerator.is_main_process:
        push_output(cfg, state.loss_cfg)
    return state

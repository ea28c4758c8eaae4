"""Stage two's recipe: train the policy against reference values streamed from a store.

Only the policy model is loaded. :meth:`Recipe.setup` runs small ``_setup_*`` steps that each build one
object (accelerator, data, model, objective, optimizer, scheduler, resume point, engine); :meth:`Recipe.train`
runs the loop ``train -> train_step -> forward_backward``; :meth:`Recipe.evaluate` measures the held-out
list; :mod:`dpocache.stages.train.outputs` writes checkpoints, the model and the summary. The loop never
synchronises the host with the device inside a step: metrics stay on the device until a logging step,
batches are read and collated ahead in a thread and copied asynchronously from pinned memory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from dpocache import preemption
from dpocache.config import ConfigError, check
from dpocache.console import log, progress, warn
from dpocache.data import DataConfig
from dpocache.devices import resolve_device
from dpocache.logprobs import TokenLogps
from dpocache.losses import LossConfig
from dpocache.modeling import (ModelConfig, check_model_config, check_sequence_lengths, load_causal_lm,
                               resize_for_tokenizer)
from dpocache.stages.train import outputs
from dpocache.stages.train.config import TrainConfig
from dpocache.stages.train.distributed import (configure_deepspeed, engine_name, is_deepspeed, make_accelerator,
                                               zero_stage)
from dpocache.stages.train.engine import choose_logps_path, compute_dtype, prepare_model, restore_optimizer
from dpocache.stages.train.evaluate import evaluate
from dpocache.stages.train.examples import (TrainingData, data_source, heldout_overlap, load_training_data,
                                            store_source)
from dpocache.stages.train.forward import policy_logps
from dpocache.stages.train.guards import FiniteGuard, NonFiniteError, PreemptionAgreement, fused_adamw
from dpocache.stages.train.loader import Collator, HostBatch, Prefetcher, plan
from dpocache.stages.train.objective import Objective
from dpocache.stages.train.tracking import DeviceMetrics, JsonlWriter, compact_line

RESUME_FIELDS = ("learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler_type", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "seed", "max_grad_norm", "group_by_length", "use_lora", "lora_rank",
                 "packing")


class Recipe:
    """One stage-two run (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, *, loss_cfg: LossConfig | None = None,
                 data_cfg: DataConfig | None = None, heldout_data: DataConfig | None = None,
                 show_progress: bool = True):
        check(model_cfg.model_name_or_path is not None, "train needs --model_name_or_path (the policy)")
        self.model_cfg, self.cfg, self.data_cfg, self.heldout_data = model_cfg, cfg, data_cfg, heldout_data
        self.loss_cfg = loss_cfg or LossConfig()
        self.show_progress = show_progress
        self.history: list[dict] = []
        self.heldout_metrics: dict = {}
        self.start_step = 0
        self.seconds = 0.0

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> "Recipe":
        from accelerate.utils import set_seed

        outputs.check_output_dir(self.cfg)
        self.accelerator = self._setup_accelerator()
        set_seed(self.cfg.seed)  # adapters' initialisation and any dropout left on
        self.device = self.accelerator.device
        self.model_config = check_model_config(self.model_cfg)
        self.objective = Objective(self.loss_cfg, reduce_mean=_reducer(self.accelerator, "mean"))
        self.data = self._setup_data()
        self.heldout = self._setup_heldout()
        self.model = self._setup_model()
        self.optimizer = self._setup_optimizer()
        self.total_steps, self.steps_per_epoch = self._setup_schedule_length()
        self.scheduler = self._setup_scheduler()
        self.settings = self._resume_settings()
        self.resume_from = self._setup_resume()
        self.logp_model = self._setup_engine()
        self.collate = self._setup_collator()
        self.guard = FiniteGuard(self.optimizer, self.device, allowed=self.cfg.skip_nonfinite_steps,
                                 on_device=fused_adamw(self.optimizer) and not is_deepspeed(self.accelerator))
        self.metrics = DeviceMetrics()
        return self

    def _setup_accelerator(self):
        device = resolve_device(self.cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        acc = make_accelerator(self.cfg, cpu=device.type == "cpu")
        if acc.device.type != device.type or (device.type == "cuda" and acc.device.index not in (None, device.index)):
            raise ConfigError(f"--device {self.cfg.device or 'auto'} resolves to {device}, but the launcher placed "
                              f"this process on {acc.device}; drop --device or launch one process per GPU")
        if device.type == "cpu":
            from dpocache.stages.train.extras import limit_allocator_retention

            limit_allocator_retention()
        return acc

    def _setup_data(self) -> TrainingData:
        data = load_training_data(self.model_cfg, self.cfg, self.data_cfg, self.loss_cfg)
        check_sequence_lengths(self.model_config, int(data.source.lengths.max()), f"example list '{data.list_name}'")
        return data

    def _setup_heldout(self):
        """The held-out source (a store list, or for a reference-free run the held-out data), or None."""
        cfg, data = self.cfg, self.data
        if cfg.heldout_store_dataset and data.store is not None:
            source = store_source(data.store, cfg.heldout_store_dataset, allow_missing=False, verify=cfg.verify_store,
                                  reference_tokens=self.objective.requirements.reference_tokens)
        elif self.heldout_data is not None and data.store is None:
            source = data_source(self.heldout_data, data.tokenizer, progress=self.show_progress)[1]
        else:
            return None
        overlap = heldout_overlap(data.source, source)
        if overlap:
            message = (f"{overlap} of the {len(set(source.hashes.tolist()))} held-out pairs are also training pairs "
                       f"(list '{data.list_name}'): the held-out figures overstate generalisation")
            if cfg.heldout_overlap == "error":
                raise ConfigError(message + "; remove them from the held-out data or pass --heldout_overlap warn")
            warn(message)
        return source

    def _setup_model(self):
        from dpocache.stages.train import extras

        cfg = self.cfg
        model_cfg = self.model_cfg
        if cfg.packing and model_cfg.attn_implementation is None and self.device.type == "cuda":
            model_cfg = dataclasses.replace(model_cfg, attn_implementation=extras.packing_attention())
            log(f"stage two: --packing on CUDA: attn_implementation {model_cfg.attn_implementation}")
        model = load_causal_lm(model_cfg, train=True)
        self.use_cache = getattr(self.model_config, "use_cache", None)  # restored in the saved config
        resize_for_tokenizer(model, self.data.tokenizer)
        if cfg.disable_dropout and (zeroed := extras.disable_dropout(model)):
            log(f"stage two: dropout off ({zeroed} non-zero rate(s) set to 0; --disable_dropout false keeps them)")
        extras.apply_liger_kernel(model, cfg.use_liger_kernel, self.device)
        if cfg.gradient_checkpointing:
            extras.enable_gradient_checkpointing(model, cfg.activation_memory_budget)
        if cfg.use_lora:
            model = extras.add_lora(model, cfg)
        if cfg.torch_compile:
            extras.compile_layers(model)
        check(not (cfg.use_lora and cfg.merge_lora and zero_stage(self.accelerator) == 3),
              "--merge_lora is not supported under DeepSpeed ZeRO-3 (parameters are partitioned): save the adapter "
              "and merge it afterwards, or use ZeRO-2")
        return model

    def _setup_optimizer(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay,
                                 fused=self.cfg.fused_optimizer or None)

    def _setup_schedule_length(self) -> tuple[int, int]:
        cfg, world = self.cfg, self.accelerator.num_processes
        micro_per_epoch = math.ceil(len(self.data.source) / (cfg.per_device_train_batch_size * world))
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps))
        return cfg.max_train_steps or steps_per_epoch * cfg.num_epochs, steps_per_epoch

    def _setup_scheduler(self):
        from transformers import get_scheduler

        kind = self.cfg.lr_scheduler_type
        return get_scheduler(kind if kind != "constant" else "constant_with_warmup", self.optimizer,
                             num_warmup_steps=int(self.cfg.warmup_ratio * self.total_steps),
                             num_training_steps=self.total_steps)

    def _resume_settings(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        settings = {k: getattr(self.cfg, k) for k in RESUME_FIELDS}
        settings.update(loss=dataclasses.asdict(self.loss_cfg), engine=engine_name(self.accelerator),
                        store_identity=self.data.fingerprint,
                        store_dataset=self.data.list_name, examples=len(self.data.source),
                        num_processes=self.accelerator.num_processes, total_steps=self.total_steps)
        return settings

    def _setup_resume(self) -> Path | None:
        """Restore weights, scheduler and RNG from the checkpoint to resume from (the optimizer, when sharded,
        after the engine is prepared); returns its path."""
        path = outputs.resume_checkpoint(self)
        if path is None and self.cfg.resume_from_checkpoint == "auto":
            log(f"stage two: no usable checkpoint in {self.cfg.output_dir}; starting from scratch")
        return path

    def _setup_engine(self):
        """Wrap the model for the launcher's engine, then probe the log-prob paths where it will train."""
        cfg, acc = self.cfg, self.accelerator
        inner = TokenLogps(self.model, selected=False, chunk=cfg.logps_chunk_size, keep_mb=cfg.logps_keep_mb,
                           load_balancing=self.loss_cfg.load_balancing_loss,
                           log_sum_sq=self.objective.requirements.policy_log_sum_sq)
        if is_deepspeed(acc):
            configure_deepspeed(acc, cfg, self.model.config)
        logp_model, self.optimizer = prepare_model(acc, inner, self.optimizer)
        self.logps_path = choose_logps_path(acc, logp_model, cfg, probe_shape=self._typical_batch_shape())
        if cfg.packing:
            from dpocache.stages.train.packing import require_packing

            require_packing(acc.unwrap_model(logp_model), wrapped=logp_model,
                            compute_dtype=compute_dtype(acc, self.model))
        if self.resume_from is not None:
            restore_optimizer(acc, self.resume_from, self.optimizer, self.scheduler)
            log(f"stage two: resumed from {self.resume_from} at step {self.start_step}")
        adamw = "fused" if fused_adamw(self.optimizer) else "for-each"
        log(f"stage two: engine {engine_name(acc)} x {acc.num_processes} process(es) on {self.device}; log-probs: "
            f"{self.logps_path}; AdamW: {adamw}")
        if cfg.with_tracking:
            from dpocache.stages.train.extras import start_trackers

            start_trackers(acc, self.model_cfg, cfg)
        return logp_model

    def _typical_batch_shape(self) -> tuple[int, int]:
        """Rows and padded width of a typical micro-batch (the 90th percentile length), for the head probe."""
        import numpy as np

        width = int(np.percentile(self.data.source.lengths, 90))
        multiple = self.cfg.pad_to_multiple_of or (64 if self.device.type == "cuda" else 1)
        return 2 * self.cfg.per_device_train_batch_size, -(-width // multiple) * multiple

    def _setup_collator(self) -> Collator:
        multiple = self.cfg.pad_to_multiple_of or (64 if self.device.type == "cuda" else 1)
        return Collator(self.data.tokenizer.pad_token_id, pad_to_multiple_of=multiple, packing=self.cfg.packing,
                        pin=self.device.type == "cuda")

    # -- the loop --------------------------------------------------------------------------------
    def _batches(self, skip: int) -> Prefetcher:
        cfg, acc = self.cfg, self.accelerator
        order = plan(self.data.source.lengths, per_device=cfg.per_device_train_batch_size,
                     accumulation=cfg.gradient_accumulation_steps, rank=acc.process_index, world=acc.num_processes,
                     seed=cfg.seed, group_by_length=cfg.group_by_length, skip=skip)
        return Prefetcher(self.data.source, order, self.collate, depth=cfg.prefetch_batches)

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        accumulation = cfg.gradient_accumulation_steps
        self.writer = JsonlWriter(Path(cfg.output_dir) / "metrics.jsonl", keep_until_step=self.start_step) \
            if acc.is_main_process else None
        self.clock = _Clock(self.start_step)
        self.seen = self.start_step * accumulation
        self.bar = progress(self.total_steps, "stage two: training", "step", initial=self.start_step,
                            enabled=self.show_progress and acc.is_main_process and _terminal())
        agreement = PreemptionAgreement(acc.num_processes)
        batches = self._batches(skip=self.start_step * accumulation)
        self.logp_model.train()
        try:
            with preemption.graceful_stop():
                for step in range(self.start_step + 1, self.total_steps + 1):
                    self.train_step(step, batches)
                    self.bar.update(1)
                    self._log(step)
                    self._maybe_checkpoint(step)
                    if step < self.total_steps and agreement.should_stop():
                        self._stop_for_preemption(step)
        finally:
            batches.close()
            agreement.close()
            self.bar.close()
            if self.writer:
                self.writer.close()
        self.seconds = self.clock.elapsed()
        if cfg.with_tracking:
            acc.end_training()
        return self.history

    def train_step(self, step: int, batches) -> None:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches, then a guarded update."""
        acc, cfg = self.accelerator, self.cfg
        loss_sum = torch.zeros((), device=self.device)
        hashes: list[str] = []
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(batches).to(self.device)
            # accelerate's accumulate(): no gradient sync until the last micro-batch; backward() divides the loss
            # by the accumulation steps (under DeepSpeed the engine does, and steps inside backward)
            with acc.accumulate(self.logp_model):
                loss_sum += self.forward_backward(batch)
            self.clock.tokens += batch.num_tokens
            self.seen += 1
            hashes += [h.decode() for h in batch.hashes]
        grad_norm = self._clip()
        if grad_norm is not None:
            self.metrics.add({"grad_norm": grad_norm})
        if self.guard.before_step(step, loss_sum, grad_norm, hashes):
            self.optimizer.step()
        self.guard.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()

    def forward_backward(self, batch: HostBatch) -> torch.Tensor:
        """Forward of chosen + rejected, the objective, backward; returns the detached loss."""
        loss, metrics = self.objective(policy_logps(self.logp_model, batch), batch)
        if is_deepspeed(self.accelerator) and not bool(torch.isfinite(loss)):
            # the DeepSpeed engine updates the weights inside backward: refuse before it does (a host sync per
            # micro-batch, on this engine only)
            raise NonFiniteError("the loss is not finite (NaN or inf) under DeepSpeed, which steps inside "
                                 "backward: training stopped before the update; the last checkpoint holds finite "
                                 f"weights (examples: {', '.join(h.decode()[:16] for h in batch.hashes[:8])})")
        self.accelerator.backward(loss)
        self.metrics.add(metrics)
        return loss.detach()

    def _clip(self) -> torch.Tensor | None:
        """The global gradient norm before clipping (a device tensor; DeepSpeed clips inside its step)."""
        acc, max_norm = self.accelerator, self.cfg.max_grad_norm
        if is_deepspeed(acc):
            norm = getattr(self.logp_model, "get_global_grad_norm", lambda: None)()
            return None if norm is None else torch.as_tensor(float(norm), device=self.device)
        norm = acc.clip_grad_norm_(self.logp_model.parameters(), max_norm if max_norm else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- between steps ---------------------------------------------------------------------------
    def _log(self, step: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        if step % cfg.logging_steps and step != self.total_steps:
            return
        skipped = self.guard.check(reduce_max=_reducer(acc, "max"))
        window_tokens, window_seconds = self.clock.window()
        metrics = self.metrics.pop(reduce=_reducer(acc, "mean"))
        metrics.update({"training_step": step, "learning_rate": self.lr,
                        "epoch": self.seen / (self.steps_per_epoch * cfg.gradient_accumulation_steps),
                        "perf/tokens_per_second": window_tokens * acc.num_processes / max(window_seconds, 1e-9),
                        "perf/elapsed_seconds": self.clock.elapsed()})
        if skipped or cfg.skip_nonfinite_steps:
            metrics["nonfinite_steps_skipped"] = skipped
        self.history.append(metrics)
        if cfg.with_tracking:
            acc.log(metrics, step=step)
        if self.writer:
            self.writer.write(metrics)
            line = compact_line(metrics, self.total_steps, self.clock.eta(step, self.total_steps))
            self.bar.write(line) if _terminal() and self.show_progress else log(line)

    def _maybe_checkpoint(self, step: int) -> None:
        cfg = self.cfg
        at_epoch_end = cfg.checkpoint_at_epoch_end and step % self.steps_per_epoch == 0
        periodic = cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0
        if (at_epoch_end or periodic) and step < self.total_steps:
            self.guard.check(reduce_max=_reducer(self.accelerator, "max"))
            outputs.write_checkpoint(self, step)

    def _stop_for_preemption(self, step: int) -> None:
        name = preemption.signal_name() or "a preemption signal"
        if self.cfg.checkpoint_on_preemption:
            self.guard.check(reduce_max=_reducer(self.accelerator, "max"))
            path = outputs.write_checkpoint(self, step)
            kept = f"checkpoint {path.name} written; rerun the same command with --resume_from_checkpoint auto to go on"
        else:
            kept = "no checkpoint written (--checkpoint_on_preemption false)"
        log(f"stage two: {name} received: stopped after step {step} of {self.total_steps}; {kept}")
        raise preemption.Preempted(f"{name} after step {step} of {self.total_steps}; {kept}")

    # -- after training --------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out figures of the trained policy (every rank takes part); {} without a held-out list."""
        if self.heldout is None:
            return {}
        acc = self.accelerator
        log(f"stage two: held-out evaluation on {len(self.heldout)} pairs ({self.heldout.description})")
        started = time.perf_counter()
        metrics = evaluate(self.logp_model, self.heldout, self.collate, self.objective,
                           batch_size=self.cfg.eval_batch_size, device=self.device, rank=acc.process_index,
                           world=acc.num_processes, reduce_sum=_reducer(acc, "sum"))
        self.heldout_metrics = {"heldout_examples": len(self.heldout),
                                **{f"heldout_{k}": v for k, v in metrics.items()}}
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())
        log(f"stage two: held-out {shown} ({len(self.heldout)} pairs, {time.perf_counter() - started:.1f} s)")
        return self.heldout_metrics


class _Clock:
    """Wall time and tokens of the run, and of the window since the last logging step."""

    def __init__(self, start_step: int):
        self.start = self.last = time.perf_counter()
        self.start_step = start_step
        self.tokens = self._last_tokens = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def window(self) -> tuple[int, float]:
        now = time.perf_counter()
        out = (self.tokens - self._last_tokens, now - self.last)
        self.last, self._last_tokens = now, self.tokens
        return out

    def eta(self, step: int, total: int) -> float | None:
        done = step - self.start_step
        return None if done <= 0 else self.elapsed() / done * (total - step)


def _terminal() -> bool:
    from dpocache.console import is_terminal

    return is_terminal()


def _reducer(acc, op: str):
    """A cross-rank reduction of a tensor (None for one process)."""
    if acc.num_processes == 1:
        return None
    if op == "max":
        import torch.distributed as dist

        def reduce_max(t):
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t

        return reduce_max
    return lambda t: acc.reduce(t, reduction=op)


def run_train(model_cfg: ModelConfig, cfg: TrainConfig, *, loss_cfg: LossConfig | None = None,
              data_cfg: DataConfig | None = None, heldout_data: DataConfig | None = None, push: bool = True,
              show_progress: bool = True, summarize: bool = True) -> Recipe:
    """Setup, train, evaluate the held-out list (if any), save, and (``summarize``) write and print the summary;
    then (``--push_to_hub``, rank 0, unless ``push`` is False) upload the model. ``data_cfg``/``heldout_data``:
    the data a reference-free loss trains and is measured on when there is no store."""
    from dpocache.hub import check_hub_access, push_output

    check_hub_access(cfg)  # no token: fail before any work
    recipe = Recipe(model_cfg, cfg, loss_cfg=loss_cfg, data_cfg=data_cfg, heldout_data=heldout_data,
                    show_progress=show_progress).setup()
    data = recipe.data
    source = data.store.root if data.store is not None else "the data (no store)"
    log(f"stage two: {len(data.source)} examples from list '{data.list_name}' of {source}; {recipe.total_steps} "
        f"optimizer steps; {recipe.loss_cfg.describe()}; learning rate {cfg.learning_rate:g}")
    recipe.train()
    recipe.evaluate()
    outputs.save(recipe)
    if summarize and recipe.accelerator.is_main_process:
        log(outputs.format_train_summary(outputs.write_summary(recipe)))
    if push and cfg.push_to_hub and recipe.accelerator.is_main_process:
        push_output(cfg, recipe.loss_cfg)
    return recipe

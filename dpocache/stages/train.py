"""Stage two: train the policy with a DPO-family loss against reference values read from a store.

Only the policy model is loaded. Recipe steps: :func:`setup` (store, examples, policy, optimizer,
schedule), :func:`train` (the loop) and :func:`save`; :func:`evaluate` measures reward accuracy and
margin of a policy on a list of stored examples.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from dpocache.artifacts import ReferenceStore
from dpocache.artifacts.identity import text_fingerprint, tokenizer_fingerprint
from dpocache.batching import epoch_order, micro_batches
from dpocache.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from dpocache.config import ConfigError, check, opt
from dpocache.logprobs import TokenLogps, pad_batch
from dpocache.losses import LOSS_TYPES, REFERENCE_FREE, SequenceLogps, batch_metrics, preference_loss
from dpocache.model_card import write_model_card
from dpocache.modeling import ModelConfig, load_causal_lm, load_tokenizer, resize_for_tokenizer
from dpocache.tracking import JsonlWriter, MetricAverager, format_line

EXAMPLE_COLUMNS = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask",
                   "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens"]


@dataclass
class TrainConfig:
    store: str | None = opt(None, "Reference store written by stage one.", group="store")
    store_dataset: str | None = opt(None, "Named example list of the store to train on (default: the only "
                                    "list, or the one `run` just scored).", group="store")
    verify_store: bool = opt(True, "Verify shard checksums when opening the store.", group="store")
    allow_missing: bool = opt(False, "Drop (and count) listed examples missing from the store instead of "
                              "failing.", group="store")
    output_dir: str = opt("output", "Where the trained model, metrics.jsonl and summaries go.",
                          group="training")
    loss_type: Literal["dpo", "dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust"] = opt(
        "dpo_norm", "Preference loss (see docs/losses.md).", group="loss")
    beta: float = opt(5.0, "Temperature of the preference loss.", group="loss")
    gamma_beta_ratio: float = opt(0.3, "SimPO target margin over beta.", group="loss")
    label_smoothing: float = opt(0.0, "Conservative/robust DPO label smoothing in [0, 0.5).", group="loss")
    sft_weight: float = opt(0.0, "Weight of an added SFT (chosen NLL per token) term.", group="loss")
    learning_rate: float = opt(2e-5, "Peak AdamW learning rate.", group="optimisation")
    weight_decay: float = opt(0.0, "AdamW weight decay.", group="optimisation")
    warmup_ratio: float = opt(0.1, "Fraction of steps with linear warm-up.", group="optimisation")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = opt(
        "linear", "Learning-rate schedule after warm-up.", group="optimisation")
    max_grad_norm: float | None = opt(None, "Clip the gradient norm to this value (None: no clipping).",
                                      group="optimisation")
    num_epochs: int = opt(1, "Passes over the examples.", group="optimisation")
    max_train_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides num_epochs).",
                                      group="optimisation")
    per_device_train_batch_size: int = opt(8, "Preference pairs per device per micro-batch.",
                                           group="optimisation")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", group="optimisation")
    group_by_length: bool = opt(True, "Group pairs of similar length into the same optimizer batches "
                                "(seeded; cuts padding).", group="optimisation")
    load_balancing_loss: bool = opt(False, "Add the MoE router load-balancing loss (e.g. OLMoE); logs aux_loss.",
                                    group="loss")
    load_balancing_weight: float = opt(0.001, "Weight of the load-balancing loss.", group="loss")
    use_lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.", group="lora")
    lora_rank: int = opt(64, "LoRA rank.", group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha.", group="lora")
    lora_dropout: float = opt(0.1, "LoRA dropout.", group="lora")
    lora_target_modules: list[str] = opt(factory=lambda: ["all-linear"], help="Modules that get adapters "
                                         "(peft names; all-linear: every linear layer but the output head).",
                                         group="lora")
    merge_lora: bool = opt(False, "Save merged full weights instead of the adapter.", group="lora")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.",
                                       group="optimisation")
    logging_steps: int = opt(1, "Log metrics every this many optimizer steps.", group="training")
    with_tracking: bool = opt(False, "Also send metrics to the trackers of --report_to.", group="tracking")
    report_to: list[str] = opt(factory=lambda: ["tensorboard"], help="Trackers: tensorboard and/or wandb "
                               "(WANDB_MODE=offline works without network).", group="tracking")
    wandb_project: str = opt("dpocache", "Tracker project name.", group="tracking")
    wandb_entity: str | None = opt(None, "wandb entity (team or user).", group="tracking")
    run_name: str | None = opt(None, "Tracker run name (default: the output directory's name).", group="tracking")
    checkpointing_steps: int | None = opt(500, "Save a resumable checkpoint every this many optimizer steps "
                                          "(None: never).", group="checkpoints")
    checkpoint_at_epoch_end: bool = opt(False, "Also save a checkpoint at the end of each epoch.",
                                        group="checkpoints")
    keep_last_n_checkpoints: int = opt(3, "Complete checkpoints to keep (the newest is never deleted).",
                                       group="checkpoints")
    resume_from_checkpoint: str | None = opt(None, "Checkpoint directory to resume from, or `auto` for the "
                                             "newest complete one in output_dir.", group="checkpoints")
    seed: int = opt(42, "Seed of data order and initialisation.", group="training")

    def __post_init__(self):
        check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}")
        check(self.beta > 0, "beta must be > 0")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        check(self.learning_rate >= 0, "learning_rate must be >= 0")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")
        check(self.num_epochs >= 1, "num_epochs must be >= 1")
        check(self.max_train_steps is None or self.max_train_steps >= 1, "max_train_steps must be >= 1")
        check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        check(self.logging_steps >= 1, "logging_steps must be >= 1")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0")
        check(self.checkpointing_steps is None or self.checkpointing_steps >= 1, "checkpointing_steps must be >= 1")
        check(self.keep_last_n_checkpoints >= 1, "keep_last_n_checkpoints must be >= 1")
        bad = sorted(set(self.report_to) - {"tensorboard", "wandb"})
        check(not bad, f"report_to: unknown tracker(s) {bad} (tensorboard, wandb)")


@dataclass
class Examples:
    """Stored examples in training form (host memory, only the columns training needs)."""

    chosen_ids: list
    chosen_mask: list
    rejected_ids: list
    rejected_mask: list
    reference: np.ndarray  # [N, 4]: ref chosen sum, ref rejected sum, chosen count, rejected count
    missing: int = 0

    def __len__(self) -> int:
        return len(self.chosen_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Padded width each pair needs in a concatenated forward."""
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen_ids, self.rejected_ids)])


def load_examples(store: ReferenceStore, hashes: list[str], *, allow_missing: bool) -> Examples:
    table, missing = store.read_rows(hashes, EXAMPLE_COLUMNS, allow_missing=allow_missing)
    ref = np.stack([table[c].to_numpy().astype(np.float64) for c in
                    ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens")], 1)
    return Examples(table["chosen_input_ids"].to_pylist(), table["chosen_mask"].to_pylist(),
                    table["rejected_input_ids"].to_pylist(), table["rejected_mask"].to_pylist(), ref, missing)


def pick_list(store: ReferenceStore, name: str | None) -> str:
    lists = store.lists()
    if name is not None:
        if name not in lists:
            raise ConfigError(f"store {store.root} has no example list '{name}'; it has: "
                              f"{', '.join(sorted(lists)) or 'none'}")
        return name
    if len(lists) != 1:
        raise ConfigError(f"store {store.root} holds {len(lists)} example lists "
                          f"({', '.join(sorted(lists)) or 'none'}): pick one with --store_dataset")
    return next(iter(lists))


def policy_tokenizer(model_cfg: ModelConfig, store: ReferenceStore):
    """The policy's tokenizer set up as stage one set it up; refused when it differs from the store's."""
    tok = load_tokenizer(model_cfg.model_name_or_path, revision=model_cfg.model_revision,
                         trust_remote_code=model_cfg.trust_remote_code)
    info = store.versions
    if info.get("chat_template") is not None:
        tok.chat_template = info["chat_template"]
    pad = info.get("pad_token")
    if pad is not None and tok.pad_token != pad:
        tok.add_special_tokens({"pad_token": pad})
    found, expected = tokenizer_fingerprint(tok), store.identity.get("tokenizer_sha256")
    if expected is not None and found != expected:
        raise ConfigError(f"the policy's tokenizer ({model_cfg.model_name_or_path}) differs from the one the "
                          f"store {store.root} was scored with (tokenizer_sha256 {found[:12]} != {expected[:12]}); "
                          "score the data with this tokenizer first")
    return tok


def forward_batch(logp_model, ex: Examples, idx, pad_id: int, device):
    """Concatenated forward of chosen + rejected; returns policy and reference SequenceLogps."""
    seqs = [ex.chosen_ids[i] for i in idx] + [ex.rejected_ids[i] for i in idx]
    masks = [ex.chosen_mask[i] for i in idx] + [ex.rejected_mask[i] for i in idx]
    ids, attn, tmask = pad_batch(seqs, masks, pad_id, device=device)
    per_token = logp_model(ids, attn, tmask)
    aux = None
    if isinstance(per_token, tuple):
        per_token, aux = per_token
    sums, counts = per_token.sum(-1), tmask.sum(-1)
    b = len(idx)
    policy = SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])
    ref = torch.as_tensor(ex.reference[np.asarray(idx)], dtype=torch.float32, device=device)
    reference = SequenceLogps(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3])
    return policy, reference, int(attn.sum()), aux


@dataclass
class TrainState:
    model_cfg: ModelConfig
    cfg: TrainConfig
    store: ReferenceStore
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


def setup(model_cfg: ModelConfig, cfg: TrainConfig, *, log=print) -> TrainState:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    check(model_cfg.model_name_or_path is not None, "train needs --model_name_or_path (the policy)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with=cfg.report_to if cfg.with_tracking else None, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    if cfg.loss_type in REFERENCE_FREE and cfg.store is None:
        raise ConfigError("reference-free training reads its examples from a store too: pass --store")
    check(cfg.store is not None, "train needs --store")
    store = ReferenceStore.open(cfg.store, verify=cfg.verify_store)
    name = pick_list(store, cfg.store_dataset)
    examples = load_examples(store, store.get_list(name), allow_missing=cfg.allow_missing)
    if examples.missing:
        log(f"stage two: {examples.missing} listed examples are missing from the store and were dropped")
    check(len(examples) > 0, f"example list '{name}' of {store.root} is empty")
    tokenizer = policy_tokenizer(model_cfg, store)
    model = load_causal_lm(model_cfg, train=True)
    resize_for_tokenizer(model, tokenizer)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_lora:
        model = add_lora(model, cfg)
    logp_model = TokenLogps(model, load_balancing=cfg.load_balancing_loss)
    world = accelerator.num_processes
    micro_per_epoch = math.ceil(len(examples) / (cfg.per_device_train_batch_size * world))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps))
    total = cfg.max_train_steps or steps_per_epoch * cfg.num_epochs
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type if cfg.lr_scheduler_type != "constant"
                              else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * total), num_training_steps=total)
    settings = resume_settings(cfg, store, name, len(examples), world, total)
    start_step = 0
    ckpt = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if ckpt is not None:
        start_step = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                     settings=settings)["step"]
        log(f"stage two: resumed from {ckpt} at step {start_step}")
    elif cfg.resume_from_checkpoint == "auto":
        log(f"stage two: no complete checkpoint in {cfg.output_dir}; starting from scratch")
    logp_model, optimizer = accelerator.prepare(logp_model, optimizer)
    if cfg.with_tracking:
        start_trackers(accelerator, model_cfg, cfg)
    return TrainState(model_cfg, cfg, store, name, examples, tokenizer, model, logp_model, optimizer,
                      scheduler, accelerator, total, steps_per_epoch, settings, start_step)


RESUME_FIELDS = ("loss_type", "beta", "gamma_beta_ratio", "label_smoothing", "sft_weight", "learning_rate",
                 "weight_decay", "warmup_ratio", "lr_scheduler_type", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "seed", "max_grad_norm", "group_by_length", "use_lora", "lora_rank",
                 "load_balancing_loss")


def resume_settings(cfg: TrainConfig, store: ReferenceStore, list_name: str, n: int, world: int,
                    total: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    settings = {k: getattr(cfg, k) for k in RESUME_FIELDS}
    settings.update(store_identity=text_fingerprint(json.dumps(store.identity, sort_keys=True)),
                    store_dataset=list_name, examples=n, num_processes=world, total_steps=total)
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
    acc = state.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(state.logp_model).model
        save_checkpoint(state.cfg.output_dir, step, model_state=model.state_dict(), optimizer=state.optimizer,
                        scheduler=state.scheduler, settings=state.settings,
                        keep_last=state.cfg.keep_last_n_checkpoints)
    acc.wait_for_everyone()


def train(state: TrainState, *, progress=True, log=print) -> list[dict]:
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
    for step in range(start + 1, state.total_steps + 1):
        grad_norm = None
        for _ in range(cfg.gradient_accumulation_steps):
            epoch, idx = next(micro)
            # accelerate's accumulate(): no gradient sync and no optimizer step until the last
            # micro-batch; backward() divides the loss by the accumulation steps (DeepSpeed: the engine).
            with acc.accumulate(state.logp_model):
                policy, reference, ntok, aux = forward_batch(state.logp_model, state.examples, idx,
                                                             state.tokenizer.pad_token_id, acc.device)
                out = preference_loss(cfg.loss_type, policy, reference, beta=cfg.beta,
                                      label_smoothing=cfg.label_smoothing,
                                      gamma_beta_ratio=cfg.gamma_beta_ratio, sft_weight=cfg.sft_weight)
                loss = out.losses.mean()
                if aux is not None:
                    loss = loss + cfg.load_balancing_weight * aux
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = _clip(acc, state, cfg.max_grad_norm)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
            averager.add(batch_metrics(out))
            if aux is not None:
                averager.add({"aux_loss": float(aux.detach())})
            tokens += ntok
            seen += 1
        if grad_norm is not None:
            averager.add({"grad_norm": grad_norm})
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        bar.update(1)
        if step % cfg.logging_steps == 0 or step == state.total_steps:
            metrics = _reduce(acc, averager.pop())
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


def start_trackers(acc, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Initialise accelerate's trackers with the run's configuration (no secrets are logged)."""
    from dpocache.config import to_dict

    config = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
              for k, v in to_dict(model_cfg, cfg).items()}
    name = cfg.run_name or Path(cfg.output_dir).resolve().name
    kwargs = {"wandb": {"name": name, "dir": str(Path(cfg.output_dir).resolve())}}
    if cfg.wandb_entity:
        kwargs["wandb"]["entity"] = cfg.wandb_entity
    try:
        acc.init_trackers(cfg.wandb_project, config=config, init_kwargs=kwargs)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(f"--with_tracking --report_to {' '.join(cfg.report_to)}: tracker not installed ({exc}); "
                          "pip install 'dpocache[tracking]'") from None


def add_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--use_lora needs peft: pip install 'dpocache[lora]'") from None
    targets = cfg.lora_target_modules
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _clip(acc, state: TrainState, max_norm: float | None) -> float | None:
    """Clip (when asked) and return the global gradient norm before clipping."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        engine = state.logp_model
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        return None if norm is None else float(norm)
    norm = acc.clip_grad_norm_(state.logp_model.parameters(), max_norm if max_norm else float("inf"))
    return float(norm)


def _reduce(acc, metrics: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=acc.device)
    values = acc.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def save(state: TrainState, *, log=print) -> Path:
    """Final model (safetensors) and tokenizer (with its chat template) into ``output_dir``."""
    acc = state.accelerator
    out = Path(state.cfg.output_dir)
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(state.logp_model).model
        out.mkdir(parents=True, exist_ok=True)
        if state.cfg.use_lora and state.cfg.merge_lora:
            model = model.merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        state.tokenizer.save_pretrained(out)
        write_model_card(out, base_model=state.model_cfg.model_name_or_path, train_cfg=state.cfg,
                         store_root=state.store.root, store_identity=state.store.identity,
                         list_name=state.list_name, examples=len(state.examples),
                         final_metrics=state.history[-1] if state.history else {})
        log(f"stage two: model, tokenizer and model card saved to {out}")
    acc.wait_for_everyone()
    return out


@torch.no_grad()
def evaluate(logp_model, examples: Examples, pad_id: int, *, loss_type: str, beta: float,
             batch_size: int = 8, device="cpu") -> dict[str, float]:
    """Reward accuracy and margin of the policy against the stored reference on ``examples``."""
    from dpocache.losses import AVERAGED

    averaged = loss_type in AVERAGED
    was_training = logp_model.training
    logp_model.eval()
    correct, margins = [], []
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        policy, reference, _, _ = forward_batch(logp_model, examples, idx, pad_id, device)
        pc, pr = policy.pick(averaged)
        rc, rr = reference.pick(averaged)
        margin = beta * ((pc - rc) - (pr - rr))
        margins.append(margin)
        correct.append((margin > 0).float())
    logp_model.train(was_training)
    return {"reward_accuracy": torch.cat(correct).mean().item(), "reward_margin": torch.cat(margins).mean().item()}


def run_train(model_cfg: ModelConfig, cfg: TrainConfig, *, progress=True, log=print) -> TrainState:
    state = setup(model_cfg, cfg, log=log)
    log(f"stage two: {len(state.examples)} examples from list '{state.list_name}' of {state.store.root}; "
        f"{state.total_steps} optimizer steps, loss {cfg.loss_type}")
    train(state, progress=progress, log=log)
    save(state, log=log)
    return state

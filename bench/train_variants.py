"""The stage-two training variants of ``bench_train.py`` and ``bench/gpu/run.py``, each run alone in a
child process.

Every variant reads the same plan (examples and the exact sequence of batches) and reports, per
optimizer step, the non-pad tokens it processed and the time the step ended. Variants:

- ``dpocache``: stage two through ``dpocache.stages.train`` (``setup`` + ``train``) on the scored store;
- ``trl_precompute`` / ``trl_live``: TRL's ``DPOTrainer`` with precomputed reference log-probs, or with a
  live reference model, fed the same token ids in the same batches;
- ``bare``: a plain forward + backward + AdamW loop (loss: mean log-prob of the trainable tokens; AdamW fused,
  the default of dpocache and TRL);
- ``forward``: a plain ``no_grad`` forward loop computing the same per-token log-probs (over the plan's
  ``forward_batches`` of single sequences when it has them: stage one's batches).

The plan's ``device`` (default ``cpu``) and ``bf16`` (default off) apply to every variant but ``dpocache``:
bf16 is autocast over fp32 weights for training (as ``dpocache train --bf16`` and TRL's ``bf16``) and
bf16 weights for ``forward`` (as ``dpocache score --dtype bfloat16``). On CUDA each step ends with a
device synchronisation, so step times are the device's.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

VARIANTS = ("dpocache", "trl_precompute", "trl_live", "bare", "forward")


class StepClock:
    """Wall and process CPU time at the end of each optimizer step, and the tokens of each step."""

    def __init__(self, device: str = "cpu"):
        self.tokens: list[int] = []
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.cuda = device.startswith("cuda")

    def tick(self, *_args, **_kwargs) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self, init: float) -> dict:
        return {"step_tokens": self.tokens, "step_ends": self.wall, "step_cpu": self.cpu, "init_seconds": init}


def pad_rows(plan: dict, seqs: list, masks: list):
    """Right-padded ``input_ids``, ``attention_mask`` and trainable mask of ``seqs`` (host tensors)."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), plan["pad_id"], dtype=torch.long)
    attn = torch.zeros_like(ids)
    tmask = torch.zeros_like(ids)
    for row, (seq, mask) in enumerate(zip(seqs, masks)):
        ids[row, :len(seq)] = torch.tensor(seq)
        attn[row, :len(seq)] = 1
        tmask[row, :len(seq)] = torch.tensor(mask)
    return ids, attn, tmask


def padded(plan: dict, idx: list[int]):
    """Right-padded ``input_ids``, ``attention_mask`` and trainable mask of chosen + rejected."""
    seqs = [plan["chosen_ids"][i] for i in idx] + [plan["rejected_ids"][i] for i in idx]
    masks = [plan["chosen_mask"][i] for i in idx] + [plan["rejected_mask"][i] for i in idx]
    return pad_rows(plan, seqs, masks)


def forward_batches(plan: dict):
    """Host batches of the ``forward`` variant: the plan's ``forward_batches`` ([side, index] pairs, side 0
    chosen, 1 rejected) when given, else chosen + rejected of each training step."""
    if "forward_batches" not in plan:
        yield from (padded(plan, idx) for idx in plan["steps"])
        return
    sides = ("chosen", "rejected")
    for batch in plan["forward_batches"]:
        yield pad_rows(plan, [plan[f"{sides[s]}_ids"][i] for s, i in batch],
                       [plan[f"{sides[s]}_mask"][i] for s, i in batch])


def _device(plan: dict) -> str:
    return plan.get("device", "cpu")


def _autocast(plan: dict):
    import torch

    if not plan.get("bf16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(plan).split(":")[0], dtype=torch.bfloat16)


def _load_model(plan: dict, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(plan["model"], dtype=getattr(torch, dtype)).to(_device(plan))


def _token_logps(logits, ids):
    """fp32 log-softmax of each position's logits at the next token."""
    return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def run_bare(plan: dict, work: Path) -> dict:
    """Forward, full fp32 log-softmax, loss = -mean log-prob at trainable labels, backward, AdamW."""
    import torch

    t0 = time.perf_counter()
    device = _device(plan)
    model = _load_model(plan).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan["lr"], weight_decay=0.0, fused=True)
    init = time.perf_counter() - t0
    clock = StepClock(device)
    for idx in plan["steps"]:
        ids, attn, tmask = padded(plan, idx)
        clock.tokens.append(int(attn.sum()))
        ids, attn, tmask = (t.to(device) for t in (ids, attn, tmask))
        with _autocast(plan):
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        labels = tmask[:, 1:].float()
        loss = -(_token_logps(logits, ids) * labels).sum() / labels.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        clock.tick()
    return clock.result(init)


def run_forward(plan: dict, work: Path) -> dict:
    """The same per-token log-probs under ``no_grad`` (no backward, no optimizer); the per-sequence sums
    are copied to the host after each batch, as a scorer does."""
    import torch

    t0 = time.perf_counter()
    device = _device(plan)
    model = _load_model(plan, "bfloat16" if plan.get("bf16") else "float32").eval()
    init = time.perf_counter() - t0
    clock = StepClock(device)
    with torch.no_grad():
        for ids, attn, tmask in forward_batches(plan):
            clock.tokens.append(int(attn.sum()))
            ids, attn, tmask = (t.to(device) for t in (ids, attn, tmask))
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            (_token_logps(logits, ids) * tmask[:, 1:]).sum(-1).cpu()
            del logits
            clock.tick()
    return clock.result(init)


def run_dpocache(plan: dict, work: Path) -> dict:
    """Stage two exactly as ``dpocache train`` runs it (API: ``Recipe.setup`` then ``Recipe.train``), on the scored
    store. Each optimizer step is stamped when ``train_step`` returns; its tokens are the non-pad tokens the
    recipe counted (both taken on the host, outside the step)."""
    from dpocache.config import build
    from dpocache.losses import LossConfig
    from dpocache.modeling import ModelConfig
    from dpocache.stages.train import Recipe, TrainConfig

    total = len(plan["steps"])
    values = dict(store=plan["store"], output_dir=str(work / "dpocache-out"), loss_type="dpo", beta=0.1,
                  learning_rate=plan["lr"], warmup_ratio=0.0, per_device_train_batch_size=plan["batch"],
                  max_train_steps=total, checkpointing_steps=None, logging_steps=1, seed=plan["seed"],
                  overwrite_output_dir=True)
    cfg, loss_cfg = build([TrainConfig, LossConfig], {**values, **plan.get("dpocache_set", {})},
                          source="--dpocache_set")
    t0 = time.perf_counter()
    recipe = Recipe(ModelConfig(model_name_or_path=plan["model"]), cfg, loss_cfg=loss_cfg, show_progress=False).setup()
    init = time.perf_counter() - t0
    clock = StepClock(_device(plan))
    step = recipe.train_step

    def timed_step(number, batches):
        before = recipe.clock.tokens
        step(number, batches)
        clock.tick()
        clock.tokens.append(recipe.clock.tokens - before)

    recipe.train_step = timed_step
    recipe.train()
    if len(clock.wall) != total:
        raise RuntimeError(f"expected {total} timed steps from dpocache train, got {len(clock.wall)}")
    return clock.result(init)


def trl_dataset(plan: dict) -> dict:
    """The plan's pairs as TRL's tokenized columns: the shared prompt, then each completion.

    The prompt is everything before the first trainable token, so prompt + completion is exactly the
    stored sequence and TRL's completion mask is exactly the stored trainable mask.
    """
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for c, cm, r, rm in zip(plan["chosen_ids"], plan["chosen_mask"], plan["rejected_ids"], plan["rejected_mask"]):
        start = cm.index(1)
        if rm.index(1) != start or c[:start] != r[:start] or any(v == 0 for v in cm[start:] + rm[start:]):
            raise ValueError("bench data: chosen and rejected must share the prompt and train on a suffix")
        out["prompt_ids"].append(c[:start])
        out["chosen_ids"].append(c[start:])
        out["rejected_ids"].append(r[start:])
    return out


def run_trl(plan: dict, work: Path, *, precompute: bool) -> dict:
    """TRL ``DPOTrainer`` on the same ids and batches: fp32 weights (bf16 autocast with the plan's ``bf16``),
    fused AdamW, no gradient checkpointing, no clipping, dropout off, no workers, no reporting, no saving."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    clock = StepClock(_device(plan))
    base = DataCollatorForPreference(pad_token_id=plan["pad_id"], max_length=plan["max_length"])

    def collate(examples):
        batch = base(examples)
        clock.tokens.append(int(batch["attention_mask"].sum()))
        return batch

    order = [i for idx in plan["steps"] for i in idx]

    class PlanSampler(torch.utils.data.Sampler):
        def __iter__(self):
            return iter(order)

        def __len__(self):
            return len(order)

    class PlanDPOTrainer(DPOTrainer):
        """Takes the already tokenized columns as they are and draws the plan's batches."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def _get_train_sampler(self, train_dataset=None):
            return PlanSampler()

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    total = len(plan["steps"])
    cpu = not _device(plan).startswith("cuda")
    args = DPOConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=plan["batch"], gradient_accumulation_steps=1,
        learning_rate=plan["lr"], optim="adamw_torch_fused", weight_decay=0.0, lr_scheduler_type="linear",
        max_steps=total, max_length=plan["max_length"], beta=0.1, loss_type=["sigmoid"],
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=plan["batch"], gradient_checkpointing=False,
        bf16=bool(plan.get("bf16")), fp16=False, use_cpu=cpu, dataloader_num_workers=0, dataloader_pin_memory=not cpu,
        report_to=[],
        save_strategy="no", eval_strategy="no", logging_steps=total + 1, disable_tqdm=True, seed=plan["seed"],
        max_grad_norm=0.0, disable_dropout=True, model_init_kwargs={"dtype": torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(plan["model"])
    tokenizer.pad_token = plan["pad_token"]
    t0 = time.perf_counter()
    trainer = PlanDPOTrainer(model=plan["model"], args=args, train_dataset=Dataset.from_dict(trl_dataset(plan)),
                             processing_class=tokenizer, data_collator=collate, callbacks=[StepEnd()])
    init = time.perf_counter() - t0
    clock.tokens.clear()  # the precompute pass used the collator too
    trainer.train()
    return clock.result(init)


def run_variant(name: str, plan_path: Path) -> dict:
    """Run one variant and return its measurements (with this process's peak RSS)."""
    from benchlib import self_peak_rss

    plan = json.loads(plan_path.read_text())
    work = plan_path.parent
    runners = {"dpocache": run_dpocache, "bare": run_bare, "forward": run_forward,
               "trl_precompute": lambda p, w: run_trl(p, w, precompute=True),
               "trl_live": lambda p, w: run_trl(p, w, precompute=False)}
    out = runners[name](plan, work)
    out.update(variant=name, peak_rss=self_peak_rss())
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out

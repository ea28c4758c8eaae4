"""Stage two's options: one typed, validated dataclass (every field is a flag and a YAML key)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpocache.config import check, opt

DEFAULT_LEARNING_RATE = 1e-6


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
    overwrite_output_dir: bool = opt(False, "Train into an output_dir that already holds results (its old model, "
                                     "metrics, plots and checkpoints are removed first). Without it a non-empty "
                                     "output_dir is refused, unless the run resumes from it.", group="training")
    device: str | None = opt(None, "Device to train on (cpu, cuda, cuda:N). Default: cuda:LOCAL_RANK under a "
                             "launcher, cuda:0 alone, the CPU without CUDA.", group="training")
    heldout_store_dataset: str | None = opt(None, "Held-out example list of the store: after training, the policy's "
                                            "reward accuracy and margin on it are measured, logged and written to "
                                            "summary.json and the model card (`run` sets it to the held-out list it "
                                            "scores).", group="store")
    heldout_overlap: Literal["warn", "error"] = opt("warn", "Held-out pairs that are also training pairs: warn (count "
                                                    "them) or refuse to train.", group="store")
    eval_batch_size: int = opt(8, "Pairs per forward pass in the held-out evaluation.", group="training")
    learning_rate: float | None = opt(
        None, "Peak AdamW learning rate. Not given: 1e-6, TRL's DPO default and the OLMo 2 7B/13B recipes' value "
        "for full fine-tuning of 1B-13B models (Tulu 3 8B used 5e-7; LoRA adapters and models far below 1B usually "
        "want 1e-5 to 1e-4; the embedded demo's 135M model trains at 2e-5).", group="optimisation")
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
    disable_dropout: bool = opt(True, "Set every dropout rate of the policy to 0 (dropout modules and the attention "
                                "dropout rates models apply themselves). The stored reference was scored without "
                                "dropout, so dropout in the policy alone would add noise to every log-ratio.",
                                group="optimisation")
    packing: bool = opt(False, "Padding-free batches: each micro-batch's sequences run as one row with position "
                        "ids restarting per sequence (needs a model whose attention honours packed position ids; "
                        "checked at start-up).", group="optimisation")
    use_lora: bool = opt(False, "Train LoRA adapters (peft) instead of all weights.", group="lora")
    lora_rank: int = opt(64, "LoRA rank.", group="lora")
    lora_alpha: float = opt(16.0, "LoRA alpha.", group="lora")
    lora_dropout: float = opt(0.1, "LoRA dropout.", group="lora")
    lora_target_modules: list[str] = opt(factory=lambda: ["all-linear"], help="Modules that get adapters "
                                         "(peft names; all-linear: every linear layer but the output head).",
                                         group="lora")
    merge_lora: bool = opt(False, "Save merged full weights instead of the adapter.", group="lora")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.",
                                       group="efficiency")
    activation_memory_budget: float = opt(
        0.0, "With --gradient_checkpointing: fraction of decoder layers that keep their activations (like "
        "torch's activation_memory_budget): 0 recomputes every layer in backward (least memory), 0.5 half of "
        "them (the last layers keep theirs), 1 none.", group="efficiency")
    bf16: bool = opt(False, "bfloat16 autocast for the forward/backward (weights and AdamW stay fp32; "
                     "log-softmax stays fp32). Under DeepSpeed: its bf16 mode.", group="efficiency")
    fused_logps: bool | None = opt(None, "Chunked log-probs: apply the output head only at positions that predict "
                                   "a trainable token, in checkpointed chunks, never building the [B, T, V] logits "
                                   "(models whose logits are not lm_head(hidden) fall back to the full forward). "
                                   "auto (default): chunked on CPU; on CUDA the faster of the two, measured on the "
                                   "first batch.", group="efficiency")
    pad_to_multiple_of: int | None = opt(None, "Pad each micro-batch's sequences to a multiple of this length, so "
                                         "kernels and attention plans are reused across steps (default: 64 on CUDA, "
                                         "1 on CPU).", group="efficiency")
    prefetch_batches: int = opt(4, "Micro-batches read from the store and collated ahead of the step, in a "
                                "background thread.", group="efficiency")
    torch_compile: bool = opt(False, "Compile the model's decoder layers with torch.compile.", group="efficiency")
    logps_chunk_size: int = opt(1024, "Rows of hidden states per output-head chunk of --fused_logps.",
                                group="efficiency")
    logps_keep_mb: float = opt(1024.0, "Memory (MiB) of output-head logits --fused_logps keeps for backward; "
                               "chunks beyond it are recomputed in backward (0: recompute all, least memory).",
                               group="efficiency")
    fused_optimizer: bool = opt(True, "AdamW's fused implementation (one kernel over all parameters, CPU and "
                                "CUDA; 4-5x faster optimizer steps on CPU); off: the for-each implementation.",
                                group="efficiency")
    release_host_memory: bool = opt(False, "On CPU: after each optimizer step, return the allocator's free heap "
                                    "pages to the system (glibc malloc_trim) when >= 512 MiB sit free, so a step's "
                                    "activations do not land on top of the previous step's freed ones: about "
                                    "7 percent lower peak RSS for about 6 percent of speed (BENCHMARKS.md).",
                                    group="efficiency")
    use_liger_kernel: bool | None = opt(None, "Patch the model with Liger's Triton kernels (RMSNorm, RoPE, SwiGLU). "
                                        "auto (default): on CUDA when liger-kernel is installed; true: required "
                                        "(without a GPU: a message and the plain kernels).", group="efficiency")
    logging_steps: int = opt(1, "Log metrics every this many optimizer steps.", group="training")
    with_tracking: bool = opt(False, "Also send metrics to the trackers of --report_to.", group="tracking")
    report_to: list[str] = opt(factory=lambda: ["tensorboard"], help="Trackers: tensorboard and/or wandb "
                               "(WANDB_MODE=offline works without network).", group="tracking")
    wandb_project: str = opt("dpocache", "Tracker project name.", group="tracking")
    wandb_entity: str | None = opt(None, "wandb entity (team or user).", group="tracking")
    run_name: str | None = opt(None, "Tracker run name (default: the output directory's name).", group="tracking")
    skip_nonfinite_steps: int = opt(0, "Optimizer steps whose loss or gradient norm is NaN/inf that may be skipped "
                                    "(counted as nonfinite_steps_skipped) before training stops; 0: stop at the "
                                    "first one.", group="optimisation")
    checkpoint_on_preemption: bool = opt(True, "On SIGTERM/SIGUSR1 (cluster preemption), write a checkpoint at the "
                                         "next step boundary before exiting with code 75.", group="checkpoints")
    checkpointing_steps: int | None = opt(500, "Save a resumable checkpoint every this many optimizer steps "
                                          "(None: never).", group="checkpoints")
    checkpoint_at_epoch_end: bool = opt(False, "Also save a checkpoint at the end of each epoch.",
                                        group="checkpoints")
    keep_last_n_checkpoints: int = opt(3, "Complete checkpoints to keep (the newest is never deleted).",
                                       group="checkpoints")
    resume_from_checkpoint: str | None = opt(None, "Checkpoint directory to resume from, or `auto` for the "
                                             "newest complete one in output_dir.", group="checkpoints")
    seed: int = opt(42, "Seed of data order and initialisation.", group="training")
    push_to_hub: bool = opt(False, "Upload the saved model (weights, config, tokenizer, model card) to the "
                            "Hugging Face Hub after training; the token comes from HF_TOKEN or `hf auth login`.",
                            group="hub")
    hf_repo_id: str | None = opt(None, "Hub repository to push to: `org/name` or `name` (your namespace).",
                                 group="hub")
    hf_repo_revision: str | None = opt(None, "Branch to push to (created when missing; default: main).",
                                       group="hub")
    hf_private: bool = opt(True, "Create the Hub repository private (ignored when it already exists).",
                           group="hub")

    def __post_init__(self):
        self._learning_rate_default = self.learning_rate is None
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE
        check(math.isfinite(self.learning_rate) and self.learning_rate >= 0,
              f"learning_rate must be a finite number >= 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")
        check(self.num_epochs >= 1, "num_epochs must be >= 1")
        check(self.max_train_steps is None or self.max_train_steps >= 1, "max_train_steps must be >= 1")
        check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        check(self.logging_steps >= 1, "logging_steps must be >= 1")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0")
        check(self.checkpointing_steps is None or self.checkpointing_steps >= 1, "checkpointing_steps must be >= 1")
        check(0.0 <= self.activation_memory_budget <= 1.0, "activation_memory_budget must be in [0, 1]")
        check(self.logps_chunk_size >= 1, "logps_chunk_size must be >= 1")
        check(self.logps_keep_mb >= 0, "logps_keep_mb must be >= 0")
        check(self.keep_last_n_checkpoints >= 1, "keep_last_n_checkpoints must be >= 1")
        check(self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        check(self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1, "pad_to_multiple_of must be >= 1")
        check(self.prefetch_batches >= 1, "prefetch_batches must be >= 1")
        check(self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps must be >= 0")
        check(bool(str(self.output_dir).strip()), "output_dir: empty path")
        out = Path(self.output_dir).expanduser()
        check(not out.exists() or out.is_dir(), f"output_dir: {out} exists and is not a directory")
        bad = sorted(set(self.report_to) - {"tensorboard", "wandb"})
        check(not bad, f"report_to: unknown tracker(s) {bad} (tensorboard, wandb)")
        check(not self.push_to_hub or self.hf_repo_id is not None, "push_to_hub needs --hf_repo_id (org/name)")
        if self.hf_repo_id is not None:
            check(valid_repo_id(self.hf_repo_id), f"hf_repo_id: {self.hf_repo_id!r} is not a Hub repository id "
                  "(expected `org/name` or `name`: letters, digits, '-', '_', '.'; at most 96 characters each)")
        if self.hf_repo_revision is not None:
            check(valid_branch(self.hf_repo_revision), f"hf_repo_revision: {self.hf_repo_revision!r} is not a "
                  "branch name (no spaces, '..', '~', '^', ':', '\\', leading or trailing '/', or refs/ prefix)")


_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


def valid_repo_id(repo_id: str) -> bool:
    """``org/name`` or ``name`` with the Hub's name rules (no ``--`` or ``..``, no ``.git`` suffix)."""
    parts = repo_id.split("/")
    return (len(parts) in (1, 2) and all(_REPO_PART.fullmatch(p) for p in parts)
            and "--" not in repo_id and ".." not in repo_id and not repo_id.endswith(".git"))


def valid_branch(name: str) -> bool:
    """A git branch name the Hub accepts (a subset of git's ref-name rules)."""
    bad = any(ch.isspace() or ch in "~^:?*[\\" for ch in name)
    return bool(name) and not bad and ".." not in name and not name.startswith(("/", "refs/", "-")) \
        and not name.endswith(("/", ".lock", ".")) and "//" not in name and "@{" not in name

"""Stage two's supporting pieces: trackers, LoRA, gradient clipping and metric reduction."""

from __future__ import annotations

from pathlib import Path

import torch

from dpocache.config import ConfigError
from dpocache.console import log
from dpocache.modeling import ModelConfig
from dpocache.stages.train.config import TrainConfig


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


def disable_dropout(model) -> int:
    """Zero every dropout rate of ``model``: ``nn.Dropout`` modules (and their variants) and the float rates
    that attention and MLP modules pass to functional dropout themselves (``attention_dropout``,
    ``attn_pdrop``...). The model's config is left as it is, so the saved model keeps its own rates.
    Returns how many non-zero rates were set to 0."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            changed += module.p > 0
            module.p = 0.0
            continue
        for name, value in vars(module).items():
            if type(value) is float and value > 0 and ("dropout" in name.lower() or "pdrop" in name.lower()):
                setattr(module, name, 0.0)
                changed += 1
    return int(changed)


def clip_grad(acc, logp_model, max_norm: float | None) -> float | None:
    """Clip (when asked) and return the global gradient norm before clipping."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        engine = logp_model
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        return None if norm is None else float(norm)
    norm = acc.clip_grad_norm_(logp_model.parameters(), max_norm if max_norm else float("inf"))
    return float(norm)


def reduce_metrics(acc, metrics: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=acc.device)
    values = acc.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def enable_gradient_checkpointing(model, budget: float = 0.0) -> int:
    """Recompute decoder-layer activations in backward; ``budget`` is the fraction of layers (the last
    ones) that keep their activations instead. Returns how many layers are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = round(budget * len(layers))
    for layer in layers[len(layers) - keep:] if keep else []:
        layer.gradient_checkpointing = False
    return len(layers) - keep


def apply_liger_kernel(model, mode: bool | None, device) -> bool:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, ...) patched into ``model`` on a CUDA device.

    ``mode`` None (auto): when the device is CUDA and liger-kernel is installed; True: required (a clear error
    without the package; a message and the plain kernels without a GPU); False: never. Only the model kernels are
    used: Liger's fused linear cross-entropy and its chunked preference losses need labels or a live reference
    model, while stage two computes log-probs at trainable positions itself against the STORED reference values.
    """
    if mode is False:
        return False
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda:
        if mode:
            log("--use_liger_kernel: Liger's kernels are Triton kernels and need a CUDA GPU; none is used here, so "
                "the model's own (PyTorch) kernels are used. Training is otherwise unchanged.")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if mode:
            raise ConfigError("--use_liger_kernel needs liger-kernel: pip install 'dpocache[liger]'") from None
        return False
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    log(f"stage two: Liger kernels applied to {type(model).__name__}" + (" (auto)" if mode is None else ""))
    return True


def packing_attention() -> str:
    """The attention for padding-free batches on CUDA: flash_attention_2 when installed (varlen kernels take the
    boundaries from the position ids), else PyTorch's flex_attention (block-sparse document masks, no package)."""
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "flex_attention"


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer (the unit FSDP and activation checkpointing also use); returns how
    many were compiled."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"--torch_compile: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        layer.compile()
    log(f"stage two: torch.compile on {len(layers)} decoder layers (the first steps include compilation)")
    return len(layers)


def limit_allocator_retention(threshold_mb: float = 4.0) -> bool:
    """Serve allocations of ``threshold_mb`` and more with mmap, so freed activation buffers go back to the
    system instead of staying in glibc's heap (on CPU the resident set otherwise keeps each step's peak and
    drifts up). Linux/glibc only; a no-op elsewhere or when the environment already sets the threshold."""
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or threshold_mb <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3  # glibc's M_MMAP_THRESHOLD
    return bool(libc.mallopt(m_mmap_threshold, int(threshold_mb * 2**20)))


def heap_trimmer(min_free_mb: float = 512.0):
    """A callable that returns glibc's free heap pages to the system (``malloc_trim(0)``) when at least
    ``min_free_mb`` sit free in the heap (``mallinfo2``), or None off glibc.

    Called after each optimizer step on CPU: the step's activations are freed by then, and without it
    their pages stay resident while the next step allocates on top of them. Small models free little
    per step and skip the trim (re-touching trimmed pages would cost them more than it saves).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    trim.argtypes, info.restype = [ctypes.c_size_t], MallInfo2
    limit = int(min_free_mb * 2**20)

    def release() -> bool:
        return info().fordblks >= limit and bool(trim(0))

    return release

"""The policy inside the launcher's engine: preparation, the log-prob path, a sharded optimizer's restore.

Contract:
- :func:`prepare_model` wraps the :class:`~dpocache.logprobs.TokenLogps` module and the optimizer with
  accelerate (one process, DDP, DeepSpeed ZeRO or FSDP2).
- :func:`choose_logps_path` decides, after preparation and through the wrapper (so sharded weights are
  gathered and the training autocast applies), between the chunked output head (only trainable positions,
  never the ``[B, T, V]`` logits) and the model's own forward: the chunked path must reproduce the full one
  within the tolerance of the compute dtype, else the full path is used. ``--fused_logps auto`` keeps the
  chunked path on CPU and, on CUDA, times one forward+backward of each on a probe batch shaped like the
  data's and keeps the faster; every rank takes rank 0's decision. Returns a description for the log.
- :func:`restore_optimizer` reloads a ZeRO/FSDP optimizer partition after preparation.
"""

from __future__ import annotations

import time

import torch

from dpocache.console import log
from dpocache.logprobs import probe_tolerance, selected_path_gap
from dpocache.stages.train.optim_state import load_optimizer_partition
from dpocache.stages.train.distributed import is_deepspeed, sharded_optimizer

CHUNKED = "chunked, trainable positions only"
FULL = "full logits"


def prepare_model(acc, logp_model, optimizer):
    return acc.prepare(logp_model, optimizer)


def compute_dtype(acc, model) -> torch.dtype:
    if acc.mixed_precision == "bf16":
        return torch.bfloat16
    if acc.mixed_precision == "fp16":
        return torch.float16
    return next(model.parameters()).dtype


def _broadcast(acc, value):
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _time_path(logp_model, inner, selected: bool, ids, attn, mask, reps: int = 2) -> tuple[float, int]:
    """Seconds per forward+backward and peak CUDA bytes of one path on the probe batch."""
    inner.selected = selected
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(reps + 1):  # the first run pays for kernel selection
        start = time.perf_counter()
        out = logp_model(ids, attn, mask)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    for p in logp_model.parameters():
        p.grad = None
    return best, torch.cuda.max_memory_allocated()


def _measure(acc, logp_model, inner, probe_shape: tuple[int, int]) -> str:
    model = inner.model
    vocab = model.get_output_embeddings().weight.shape[0]
    rows, width = probe_shape
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=generator).to(acc.device)
    attn = torch.ones_like(ids)
    mask = torch.ones_like(ids)
    mask[:, : width // 2] = 0  # prompts: the first half is not trained
    chunked = _time_path(logp_model, inner, True, ids, attn, mask)
    full = _time_path(logp_model, inner, False, ids, attn, mask)
    pick = CHUNKED if chunked[0] <= full[0] else FULL
    log(f"stage two: output head measured on a {rows}x{width} batch: chunked {chunked[0] * 1e3:.1f} ms, "
        f"{chunked[1] / 2**30:.2f} GiB peak; full logits {full[0] * 1e3:.1f} ms, {full[1] / 2**30:.2f} GiB peak "
        f"-> {pick}")
    return pick


def choose_logps_path(acc, logp_model, cfg, probe_shape: tuple[int, int] = (16, 512)) -> str:
    """Set ``selected`` on the unwrapped TokenLogps and return the path's description (see the docstring)."""
    inner = acc.unwrap_model(logp_model)
    if cfg.fused_logps is False:
        inner.selected = False
        return FULL
    gap = selected_path_gap(logp_model, inner)
    tolerance = probe_tolerance(compute_dtype(acc, inner.model))
    if gap is None or not gap <= tolerance:
        inner.selected = False
        why = "cannot run on this model" if gap is None else f"differs by {gap:.3g} nats (tolerance {tolerance:g})"
        return f"{FULL} (the chunked head {why})"
    choice = CHUNKED
    measurable = acc.device.type == "cuda" and not is_deepspeed(acc)
    if cfg.fused_logps is None and measurable:
        choice = _broadcast(acc, _measure(acc, logp_model, inner, probe_shape))
    inner.selected = choice == CHUNKED
    return choice


def restore_optimizer(acc, checkpoint, optimizer, scheduler) -> None:
    """A sharded engine's optimizer partition (ZeRO, FSDP2) from ``checkpoint`` (plain engines: loaded before)."""
    if sharded_optimizer(acc):
        load_optimizer_partition(checkpoint / f"optimizer_rank{acc.process_index:05d}.safetensors", optimizer,
                                 scheduler)

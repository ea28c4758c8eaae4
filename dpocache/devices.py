"""Where a process computes: the one place both stages take their device from.

Contract: :func:`resolve_device` returns ``--device`` when given, else ``cuda:LOCAL_RANK`` under a
multi-process launch (torchrun, accelerate, Slurm's ``SLURM_LOCALID``), ``cuda:0`` for a lone process,
and the CPU when CUDA is absent. :func:`to_device` moves host tensors there: from pinned memory with
``non_blocking`` when the target is a CUDA device (the copy overlaps the compute already queued), a plain
copy otherwise. :func:`release_memory` returns cached accelerator memory to the driver.
"""

from __future__ import annotations

import gc
import os

import torch

from dpocache.config import ConfigError


def local_rank() -> int:
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(var)
        if value not in (None, ""):
            return int(value)
    return 0


def resolve_device(requested: str | None = None) -> torch.device:
    """The device this process computes on (see the module docstring)."""
    if requested not in (None, "", "auto"):
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"--device {requested!r}: not a device ({exc}); use cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {requested}: CUDA is not available on this machine")
            index = device.index if device.index is not None else local_rank() % torch.cuda.device_count()
            if index >= torch.cuda.device_count():
                raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
            return torch.device("cuda", index)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def pin_host_memory(device: torch.device | str) -> bool:
    """Should host batches bound for ``device`` be allocated in pinned memory?"""
    return torch.device(device).type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``; asynchronous from pinned host memory to CUDA."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def release_memory(device: torch.device | str | None = None) -> None:
    """Drop Python references' garbage and give cached CUDA memory back (no-op on CPU)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()

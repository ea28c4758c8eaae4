"""A sharded engine's optimizer state as plain per-rank tensors (DeepSpeed ZeRO partitions, FSDP2 shards).

Contract: :func:`optimizer_partition` returns this rank's stepped tensors (ZeRO: flat fp32 partitions;
FSDP2: the local shards of the parameters) and every state tensor (step, moments) of each, as plain CPU
tensors for a safetensors file; :func:`load_optimizer_partition` restores them into a freshly prepared
optimizer of the same engine and world size (a mismatch is a ConfigError naming the file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dpocache.config import ConfigError


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _stepped_tensors(optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """The torch optimizer that really steps (under accelerate's and DeepSpeed's wrappers) and the tensors it
    steps: the parameters, or under ZeRO this rank's flat fp32 partitions (ZeRO-3 attaches them to the
    optimizer only while it steps, so they are read from the ZeRO optimizer itself)."""
    from accelerate.optimizer import AcceleratedOptimizer

    opt, parent = optimizer, None
    while isinstance(opt, AcceleratedOptimizer) or (not isinstance(opt, torch.optim.Optimizer)
                                                   and hasattr(opt, "optimizer")):
        parent, opt = opt, opt.optimizer
    flat = getattr(parent, "fp32_partitioned_groups_flat", None)
    tensors = list(flat) if flat is not None else [p for g in opt.param_groups for p in g["params"]]
    return opt, tensors


def optimizer_partition(optimizer) -> dict[str, torch.Tensor]:
    """This rank's optimizer partition as plain tensors: the values of the tensors the optimizer steps (under
    ZeRO: flat fp32 partitions of the parameters) and every state tensor (step, moments) of each."""
    base, tensors = _stepped_tensors(optimizer)
    out = {}
    for i, tensor in enumerate(tensors):
        out[f"param.{i}"] = _local(tensor).detach().contiguous().cpu().clone()
        for key, value in base.state.get(tensor, {}).items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"state.{i}.{key}"] = _local(value).detach().contiguous().cpu().clone()
    return out


def load_optimizer_partition(path: Path, optimizer, scheduler) -> None:
    """Restore :func:`optimizer_partition` into a freshly prepared (same world size, same ZeRO stage) optimizer;
    the learning rates come from the restored ``scheduler``."""
    if not path.is_file():
        raise ConfigError(f"cannot resume from {path.parent}: {path.name} is missing (was the checkpoint written "
                          "by a run with another engine or number of processes?)")
    saved = load_file(str(path))
    base, tensors = _stepped_tensors(optimizer)
    for group, lr in zip(base.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    if sum(1 for k in saved if k.startswith("param.")) != len(tensors):
        raise ConfigError(f"cannot resume from {path.parent}: {path.name} holds another number of optimizer "
                          f"partitions than this run ({len(tensors)})")
    for i, tensor in enumerate(tensors):
        value, local = saved[f"param.{i}"], _local(tensor)
        if value.shape != local.shape:
            raise ConfigError(f"cannot resume from {path.parent}: optimizer partition {i} has shape "
                              f"{tuple(value.shape)}, this run {tuple(local.shape)}")
        with torch.no_grad():
            local.copy_(value.to(local.dtype))
        prefix = f"state.{i}."
        state = {k[len(prefix):]: _like(v, tensor) for k, v in saved.items() if k.startswith(prefix)}
        if state:
            base.state[tensor] = state


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved state tensor placed like ``param``: a DTensor with the parameter's sharding for FSDP2 moments,
    a plain tensor on its device otherwise (scalars such as ``step`` stay plain)."""
    local = _local(param)
    value = value.to(local.device)
    if hasattr(param, "to_local") and value.shape == local.shape and value.dim() > 0:
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return value

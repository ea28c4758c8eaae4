"""Training checkpoints: atomic, complete-or-absent, pruned, and safe to load.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step_00000042`` holding
``model.safetensors`` (the full policy weights, gathered from every rank under ZeRO-3),
``optimizer.pt`` (tensors and plain values only, loaded with ``torch.load(weights_only=True)``) or, under
DeepSpeed ZeRO, one ``optimizer_rankNNNNN.safetensors`` per rank (that rank's fp32 partition and its
AdamW moments), ``rng_rankNNNNN.pt`` per rank (torch RNG states, loaded with ``weights_only=True``),
``trainer_state.json`` (step, scheduler state, and the settings a resume must match) and ``COMPLETE``,
written last by rank 0 once every rank has written its part. It is assembled in a temporary directory
and renamed into place, so a crash leaves either a complete checkpoint or an ignored temporary
directory. With several nodes, ``output_dir`` must be on a file system every node sees.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpocache.artifacts.manifest import pid_alive
from dpocache.config import ConfigError
from dpocache.files import fsync_dir

MARKER = "COMPLETE"
PREFIX = "step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete or temporary directories are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``auto``: the newest complete checkpoint in ``output_dir`` (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {MARKER} marker)")
    return path


def staging_dir(output_dir: str | Path, step: int, owner_pid: int) -> Path:
    """Where a checkpoint is assembled before it is renamed into place (``owner_pid``: rank 0's pid)."""
    return checkpoint_root(output_dir) / f".tmp-{PREFIX}{step:08d}-{owner_pid}"


def begin_checkpoint(output_dir: str | Path, step: int, owner_pid: int) -> Path:
    tmp = staging_dir(output_dir, step, owner_pid)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def save_rank_state(tmp: Path, rank: int, *, sharded_optimizer=None) -> None:
    """Per-rank parts: this rank's RNG states and, under DeepSpeed ZeRO, its optimizer partition."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    torch.save(rng, tmp / f"rng_rank{rank:05d}.pt")
    if sharded_optimizer is not None:
        save_file(optimizer_partition(sharded_optimizer), str(tmp / f"optimizer_rank{rank:05d}.safetensors"))


def finish_checkpoint(output_dir: str | Path, tmp: Path, step: int, *, model_state: dict, optimizer, scheduler,
                      settings: dict, extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Rank 0: write the weights, the (unsharded) optimizer, the trainer state and the marker; rename."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(_dedupe_shared(tensors), str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "scheduler": scheduler.state_dict(), "settings": settings, **(extra or {})}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=_jsonable))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    (tmp / MARKER).write_text("ok\n")
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    if keep_last:
        prune(output_dir, keep_last)
    return final


def save_checkpoint(output_dir: str | Path, step: int, *, model_state: dict, optimizer, scheduler,
                    settings: dict, extra: dict | None = None, keep_last: int | None = None) -> Path:
    """A single-process checkpoint (every part written by this process)."""
    tmp = begin_checkpoint(output_dir, step, os.getpid())
    save_rank_state(tmp, 0)
    return finish_checkpoint(output_dir, tmp, step, model_state=model_state, optimizer=optimizer,
                             scheduler=scheduler, settings=settings, extra=extra, keep_last=keep_last)


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
        out[f"param.{i}"] = tensor.detach().contiguous().cpu().clone()
        for key, value in base.state.get(tensor, {}).items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"state.{i}.{key}"] = value.detach().contiguous().cpu().clone()
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
        value = saved[f"param.{i}"]
        if value.shape != tensor.shape:
            raise ConfigError(f"cannot resume from {path.parent}: optimizer partition {i} has shape "
                              f"{tuple(value.shape)}, this run {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(value.to(tensor.dtype))
        prefix = f"state.{i}."
        state = {k[len(prefix):]: v.to(tensor.device) for k, v in saved.items() if k.startswith(prefix)}
        if state:
            base.state[tensor] = state


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _dedupe_shared(tensors: dict) -> dict:
    """safetensors refuses aliased tensors (tied embeddings): keep one copy of each storage."""
    seen, out = {}, {}
    for name, t in tensors.items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the newest one)."""
    done = complete_checkpoints(output_dir)
    doomed = done[:-max(keep_last, 1)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    for stale in checkpoint_root(output_dir).glob(".tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return doomed


def load_checkpoint(path: Path, *, model, optimizer, scheduler, settings: dict, rank: int = 0) -> dict:
    """Restore weights, optimizer (``None``: a ZeRO partition, restored after ``prepare``), scheduler and this
    rank's RNG; refuse on any differing setting."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("settings", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: settings differ: " + "; ".join(diffs))
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = _load_weights(model, weights)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    load_rng(path, rank)
    return state


def _load_weights(model, weights: dict) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)``; under DeepSpeed ZeRO-3 (parameters partitioned at load time) each
    parameter is gathered, filled on rank 0 and re-partitioned, one at a time."""
    params = dict(model.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        return model.load_state_dict(weights, strict=False)
    from dpocache.modeling import gathered

    state_keys = set(model.state_dict().keys())
    for name, param in params.items():
        if name in weights:
            with gathered([param]), torch.no_grad():
                if torch.distributed.get_rank() == 0:
                    param.copy_(weights[name].to(param.dtype))
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in weights.items():
            if name in buffers:
                buffers[name].copy_(value)
    return sorted(state_keys - set(weights)), sorted(set(weights) - state_keys)


def load_rng(path: Path, rank: int) -> None:
    file = path / f"rng_rank{rank:05d}.pt"
    if not file.is_file():
        raise ConfigError(f"cannot resume from {path}: no RNG state for rank {rank} ({file.name})")
    rng = torch.load(file, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))


def _is_tied(model, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight and name.endswith("weight") \
        and "lm_head" in name

"""Training checkpoints: atomic, complete-or-absent, checksummed, pruned, and safe to load.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step_00000042`` holding ``model.safetensors`` (the full
policy weights, gathered from every rank under ZeRO-3 / FSDP2), ``optimizer.pt`` (tensors and plain values
only, loaded with ``torch.load(weights_only=True)``) or, under a sharded engine (DeepSpeed ZeRO, FSDP2), one
``optimizer_rankNNNNN.safetensors`` per rank (that rank's partition and its AdamW moments),
``rng_rankNNNNN.pt`` per rank, ``trainer_state.json`` (step, scheduler and objective state, the settings a
resume must match) and ``COMPLETE``, written last by rank 0 once every rank has written its part: a JSON
record of the size and sha256 of every other file. It is assembled in a temporary directory and renamed into
place, so a crash leaves either a complete checkpoint or an ignored temporary directory; a failed write (a
full disk) removes the temporary directory. :func:`verify_checkpoint` re-checks every file against the
marker; ``--resume_from_checkpoint auto`` takes the newest checkpoint that verifies and names the ones it
skipped. With several nodes, ``output_dir`` must be on a file system every node sees.
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
from dpocache.console import warn
from dpocache.files import atomic_write_json, file_sha256, fsync_dir, fsync_file
from dpocache.stages.train.optim_state import optimizer_partition

MARKER = "COMPLETE"
PREFIX = "step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints with a completion marker, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a file missing, truncated or altered, a torn state file), or None."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / MARKER}: unreadable completion marker (no file checksums)"
    for name, record in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if size != record["bytes"]:
            return f"{file}: truncated or altered ({size} bytes, the checkpoint recorded {record['bytes']})"
        if file_sha256(file) != record["sha256"]:
            return f"{file}: checksum mismatch (altered after the checkpoint was written)"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{path / 'trainer_state.json'}: unreadable ({exc})"
    return None


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``auto``: the newest checkpoint in ``output_dir`` that verifies (None if there is none), naming the ones
    skipped; an explicit path that does not verify is an error naming the file."""
    if resume is None:
        return None
    if resume == "auto":
        for path in reversed(complete_checkpoints(output_dir)):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            warn(f"resume: skipping checkpoint {path.name}: {problem}")
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {MARKER} marker)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint: cannot resume from {path}: {problem}")
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


def save_rank_state(tmp: Path, rank: int, *, sharded_optimizer=None) -> dict[str, dict]:
    """Per-rank parts: this rank's RNG states and, under a sharded engine, its optimizer partition. Returns the
    size and checksum of each file written (for the completion marker)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    names = [f"rng_rank{rank:05d}.pt"]
    torch.save(rng, tmp / names[0])
    if sharded_optimizer is not None:
        names.append(f"optimizer_rank{rank:05d}.safetensors")
        save_file(optimizer_partition(sharded_optimizer), str(tmp / names[-1]))
    for name in names:
        fsync_file(tmp / name)
    return {name: file_record(tmp / name) for name in names}


def finish_checkpoint(output_dir: str | Path, tmp: Path, step: int, *, model_state: dict, optimizer, scheduler,
                      settings: dict, records: dict, extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Rank 0: write the weights, the (unsharded) optimizer, the trainer state and the marker (with the size and
    sha256 of every file, ``records`` holding the other ranks' files); rename into place."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tensors = {k: _plain(v) for k, v in model_state.items()}
    save_file(_dedupe_shared(tensors), str(tmp / "model.safetensors"))
    written = ["model.safetensors"]
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        written.append("optimizer.pt")
    state = {"step": step, "scheduler": scheduler.state_dict(), "settings": settings, **(extra or {})}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=_jsonable))
    written.append("trainer_state.json")
    for name in written:
        fsync_file(tmp / name)
    files = dict(records, **{name: file_record(tmp / name) for name in written})
    atomic_write_json(tmp / MARKER, {"step": step, "files": dict(sorted(files.items()))})
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
    records = save_rank_state(tmp, 0)
    return finish_checkpoint(output_dir, tmp, step, model_state=model_state, optimizer=optimizer,
                             scheduler=scheduler, settings=settings, records=records, extra=extra,
                             keep_last=keep_last)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor with a storage safetensors can address (gathered FSDP weights may come with a
    storage Python cannot reach: those are copied)."""
    import warnings

    tensor = tensor.detach().contiguous().cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor.storage().data_ptr()  # what safetensors asks
    except RuntimeError:
        tensor = tensor.clone()
    return tensor


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


def load_checkpoint(path: Path, *, model, optimizer, scheduler, settings: dict, rank: int = 0,
                    objective=None) -> dict:
    """Restore weights, optimizer (``None``: a sharded partition, restored after ``prepare``), scheduler, the
    objective's state (e.g. a running reward mean) and this rank's RNG; refuse on any differing setting and on
    weights that are not finite."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("settings", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: settings differ: " + "; ".join(diffs))
    weights = load_file(str(path / "model.safetensors"))
    bad = next((k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # dpocache never writes such a checkpoint: it was altered and resealed
        raise ConfigError(f"cannot resume from {path}: {path / 'model.safetensors'}: weight {bad} holds NaN or inf")
    missing, unexpected = _load_weights(model, weights)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    if objective is not None:
        objective.load_state_dict(state.get("objective", {}))
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

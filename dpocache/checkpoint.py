"""Training checkpoints: atomic, complete-or-absent, pruned, and safe to load.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step_00000042`` holding
``model.safetensors`` (the policy weights), ``optimizer.pt`` (tensors and plain values only, loaded
with ``torch.load(weights_only=True)``), ``rng.pt`` (torch RNG states, same), ``trainer_state.json``
(step, scheduler state, and the settings a resume must match) and ``COMPLETE``, written last. It is
assembled in a temporary directory and renamed into place, so a crash leaves either a complete
checkpoint or an ignored temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpocache.artifacts.manifest import fsync_dir, pid_alive
from dpocache.config import ConfigError

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


def save_checkpoint(output_dir: str | Path, step: int, *, model_state: dict, optimizer, scheduler,
                    settings: dict, extra: dict | None = None, keep_last: int | None = None) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    save_file(_dedupe_shared(tensors), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
    torch.save(rng, tmp / "rng.pt")
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


def load_checkpoint(path: Path, *, model, optimizer, scheduler, settings: dict) -> dict:
    """Restore weights, optimizer, scheduler and RNG; refuse on any differing setting."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved = state.get("settings", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != now {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(f"cannot resume from {path}: settings differ: " + "; ".join(diffs))
    weights = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the model: missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    return state


def _is_tied(model, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight and name.endswith("weight") \
        and "lm_head" in name

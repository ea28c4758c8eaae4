"""What stage two leaves on disk: the output folder's rules, checkpoints, the final model, the summary.

Contract:
- :func:`check_output_dir`: a folder that already holds a run's results is refused unless the run resumes
  from it or ``--overwrite_output_dir`` is given, which first removes the old model, metrics, plots,
  summary and checkpoints (nothing else), so no stale result survives next to new ones.
- :func:`write_checkpoint` (every rank) and :func:`save` (every rank; rank 0 writes) never write weights that
  hold NaN/inf, turn a full disk into a one-line :class:`~dpocache.files.DiskFullError` naming the path and
  the space needed, and leave nothing half-written. Saved files get the permissions of the user's umask
  (teammates can read them) and the saved config keeps the model's own ``use_cache``.
- :func:`write_summary` writes ``summary.json`` (what was trained, how fast, final and held-out metrics).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dpocache.config import ConfigError
from dpocache.console import log
from dpocache.files import DiskFullError, atomic_write_json, disk_errors
from dpocache.stages.train.checkpoint import (begin_checkpoint, checkpoint_root, finish_checkpoint, load_checkpoint,
                                              resolve_resume, save_rank_state, staging_dir)
from dpocache.stages.train.distributed import full_state_dict, is_fsdp, sharded_optimizer, zero_stage
from dpocache.stages.train.guards import NonFiniteError

RESULT_FILES = ("metrics.jsonl", "summary.json", "README.md", "config.json", "generation_config.json",
                "model.safetensors", "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
RESULT_DIRS = ("checkpoints", "plots")
HELDOUT_KEYS = ("heldout_examples", "heldout_reward_accuracy", "heldout_reward_margin",
                "heldout_policy_preference_accuracy", "heldout_policy_logp_margin")


def _results(out: Path) -> list[Path]:
    found = [out / n for n in RESULT_FILES + RESULT_DIRS if (out / n).exists()]
    return found + sorted(out.glob("model-*-of-*.safetensors"))


def check_output_dir(cfg) -> None:
    """Refuse or clear an output folder holding a previous run's results (see the module docstring)."""
    out = Path(cfg.output_dir)
    stale = _results(out) if out.is_dir() else []
    if not stale or cfg.resume_from_checkpoint is not None:
        return
    if not cfg.overwrite_output_dir:
        names = ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else "")
        raise ConfigError(f"output_dir {out} already holds a run's results ({names}); choose another folder, pass "
                          "--overwrite_output_dir to replace them, or --resume_from_checkpoint auto to continue")
    if int(os.environ.get("RANK", "0") or 0) == 0:
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log(f"stage two: --overwrite_output_dir: removed the previous results in {out}")


def resume_checkpoint(recipe):
    """Load the checkpoint to resume from into the unprepared model (sets ``recipe.start_step``)."""
    cfg = recipe.cfg
    path = resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    if path is None:
        return None
    sharded = sharded_optimizer(recipe.accelerator)
    state = load_checkpoint(path, model=recipe.model, optimizer=None if sharded else recipe.optimizer,
                            scheduler=recipe.scheduler, settings=recipe.settings,
                            rank=recipe.accelerator.process_index, objective=recipe.objective)
    recipe.start_step = state["step"]
    return path


def require_finite(state: dict, what: str) -> None:
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{what}: weight {name} holds NaN or inf; nothing was written")


def _needed_bytes(state: dict, factor: int = 1) -> int:
    return factor * sum(t.numel() * t.element_size() for t in state.values())


def _all_ok(acc, error: BaseException | None) -> BaseException | None:
    """Every rank's outcome of a write phase; the first error (or None) on every rank."""
    if acc.num_processes == 1:
        return error
    from accelerate.utils import gather_object

    errors = [e for e in gather_object([None if error is None else (type(error).__name__, str(error))]) if e]
    if error is not None or not errors:
        return error  # this rank's own error keeps its type and traceback
    kind, message = errors[0]
    return DiskFullError(message) if kind == "DiskFullError" else RuntimeError(message)


def write_checkpoint(recipe, step: int) -> Path:
    """Every rank takes part: sharded engines gather the weights, each rank writes its RNG (and optimizer
    partition), then rank 0 completes and renames the checkpoint. A failure on any rank removes it."""
    from accelerate.utils import broadcast_object_list

    acc, cfg = recipe.accelerator, recipe.cfg
    weights = full_state_dict(acc, recipe.logp_model)
    if acc.is_main_process:
        require_finite(weights, f"checkpoint at step {step}")
    owner = broadcast_object_list([os.getpid()])[0] if acc.num_processes > 1 else os.getpid()
    tmp = staging_dir(cfg.output_dir, step, owner)
    need = _needed_bytes(weights, 4 if not sharded_optimizer(acc) else 1)
    error, records = None, {}
    try:
        with disk_errors(tmp, needed=need, what=f"writing checkpoint step {step}"):
            if acc.is_main_process:
                begin_checkpoint(cfg.output_dir, step, owner)
            acc.wait_for_everyone()
            records = save_rank_state(tmp, acc.process_index,
                                      sharded_optimizer=recipe.optimizer if sharded_optimizer(acc) else None)
    except Exception as exc:  # noqa: BLE001 - agreed on by every rank below
        error = exc
    error = _all_ok(acc, error)
    path = None
    if error is None:
        gathered = _gather_records(acc, records)
        try:
            if acc.is_main_process:
                with disk_errors(tmp, needed=need, what=f"writing checkpoint step {step}"):
                    path = finish_checkpoint(cfg.output_dir, tmp, step, model_state=weights,
                                             optimizer=None if sharded_optimizer(acc) else recipe.optimizer,
                                             scheduler=recipe.scheduler, settings=recipe.settings, records=gathered,
                                             extra={"objective": recipe.objective.state_dict()},
                                             keep_last=cfg.keep_last_n_checkpoints)
        except Exception as exc:  # noqa: BLE001
            error = exc
        error = _all_ok(acc, error)
    if error is not None:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        raise error
    acc.wait_for_everyone()
    return path or checkpoint_root(cfg.output_dir) / f"step_{step:08d}"


def _gather_records(acc, records: dict) -> dict:
    if acc.num_processes == 1:
        return records
    from accelerate.utils import gather_object

    merged: dict = {}
    for part in gather_object([records]):
        merged.update(part)
    return merged


def _readable(out: Path) -> None:
    """Give saved files the permissions of the user's umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def save(recipe) -> Path:
    """Final model (safetensors), tokenizer (with its chat template) and model card into ``output_dir``."""
    from dpocache.stages.train.model_card import write_model_card

    acc, cfg = recipe.accelerator, recipe.cfg
    out = Path(cfg.output_dir)
    acc.wait_for_everyone()
    gathered = full_state_dict(acc, recipe.logp_model) if zero_stage(acc) == 3 or is_fsdp(acc) else None
    if acc.is_main_process:
        model = acc.unwrap_model(recipe.logp_model).model
        state = gathered if gathered is not None else model.state_dict()
        require_finite(state, f"the model in {out}")
        out.mkdir(parents=True, exist_ok=True)
        if cfg.use_lora and cfg.merge_lora:
            model = model.merge_and_unload()
        if recipe.use_cache is not None:
            model.config.use_cache = recipe.use_cache
        need = _needed_bytes(state)
        try:
            with disk_errors(out, needed=need, what="saving the model"):
                model.save_pretrained(out, safe_serialization=True, state_dict=gathered)
                recipe.data.tokenizer.save_pretrained(out)
                write_model_card(out, base_model=recipe.model_cfg.model_name_or_path, train_cfg=cfg,
                                 loss_cfg=recipe.loss_cfg,
                                 store_root=getattr(recipe.data.store, "root", None),
                                 store_identity=getattr(recipe.data.store, "identity", None),
                                 list_name=recipe.data.list_name, examples=len(recipe.data.source),
                                 final_metrics=recipe.history[-1] if recipe.history else {},
                                 heldout_metrics=recipe.heldout_metrics)
        except DiskFullError:
            for name in ("model.safetensors",):
                (out / name).unlink(missing_ok=True)
            raise
        _readable(out)
        log(f"stage two: model, tokenizer and model card saved to {out}")
    acc.wait_for_everyone()
    return out


def train_summary(recipe) -> dict:
    data, acc = recipe.data, recipe.accelerator
    final = recipe.history[-1] if recipe.history else {}
    tokens = [r.get("perf/tokens_per_second") for r in recipe.history if r.get("perf/tokens_per_second")]
    return {
        "output_dir": str(Path(recipe.cfg.output_dir).resolve()),
        "store": str(data.store.root) if data.store is not None else None,
        "store_dataset": data.list_name,
        "examples": len(data.source),
        "engine": recipe.settings.get("engine"),
        "num_processes": acc.num_processes,
        "device": str(recipe.device),
        "train_steps": recipe.total_steps,
        "resumed_from_step": recipe.start_step,
        "train_seconds": round(recipe.seconds, 2),
        "tokens_per_second": round(sum(tokens) / len(tokens), 1) if tokens else None,
        "final_metrics": final,
        **dict.fromkeys(HELDOUT_KEYS), **recipe.heldout_metrics,
    }


def write_summary(recipe, extra: dict | None = None) -> dict:
    summary = dict(train_summary(recipe), **(extra or {}))
    path = Path(recipe.cfg.output_dir) / "summary.json"
    with disk_errors(path, what="writing summary.json"):
        atomic_write_json(path, summary)
    return summary


def format_train_summary(s: dict) -> str:
    fm = s.get("final_metrics") or {}
    shown = ", ".join(f"{k}={v:.4f}" for k, v in fm.items() if k in ("train_loss", "rewards/accuracy",
                                                                      "rewards/margin"))
    lines = ["", "== dpocache train: summary ==",
             f"examples:        {s['examples']} (list '{s['store_dataset']}'" + (f" of {s['store']})" if s['store']
                                                                               else ", tokenized from the data)"),
             f"training:        {s['train_steps']} steps in {s['train_seconds']} s on {s['device']} "
             f"({s['engine']} x {s['num_processes']}), {s['tokens_per_second'] or 0:,.0f} tok/s",
             f"final metrics:   {shown}"]
    if s.get("heldout_reward_accuracy") is not None:
        lines.append(f"held-out:        reward accuracy {s['heldout_reward_accuracy']:.3f}, reward margin "
                     f"{s['heldout_reward_margin']:.3f} ({s['heldout_examples']} pairs)")
    if s.get("heldout_policy_preference_accuracy") is not None:
        lines.append(f"held-out:        policy preference accuracy {s['heldout_policy_preference_accuracy']:.3f}, "
                     f"average log-prob margin {s['heldout_policy_logp_margin']:.3f} ({s['heldout_examples']} pairs)")
    lines.append(f"model:           {s['output_dir']}")
    return "\n".join(lines)


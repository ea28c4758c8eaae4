"""Corruption cases of ``bench_reliability.py`` (continued): damaged checkpoints, bad inputs, full disks; the
registry, the judging rules and the store cases are in ``reliability_cases.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from reliability_cases import case, flip, train, truncate
from reliability_runs import Workspace


# -- checkpoints -----------------------------------------------------------------------------------------
def resume(ws: Workspace, d: Path, how: str, *extra: str) -> tuple[list[str], Path]:
    """A copy of the checkpointed run (6 steps, checkpoints at 2 and 4), resumed with ``how``."""
    out = Path(shutil.copytree(ws.ckpt_run, d / "out"))
    (out / "model.safetensors").unlink()
    target = how if how == "auto" else str(out / "checkpoints" / how)
    return ws.train_args(out, "--max_train_steps", "6", "--keep_last_n_checkpoints", "3",
                         "--resume_from_checkpoint", target, *extra), out


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def reseal_checkpoint(path: Path, name: str) -> None:
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"][name] = {"bytes": (path / name).stat().st_size,
                             "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    (path / "COMPLETE").write_text(json.dumps(marker))


@case("checkpoint", "resume PATH: torn trainer_state.json")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    (ckpt(out, 4) / "trainer_state.json").write_text('{"step": 4, "sched')
    return args, out, ["trainer_state.json"]


@case("checkpoint", "resume PATH: torn trainer_state.json resealed in the marker")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    (ckpt(out, 4) / "trainer_state.json").write_text('{"step": 4, "sched')
    reseal_checkpoint(ckpt(out, 4), "trainer_state.json")
    return args, out, ["trainer_state.json"]


@case("checkpoint", "resume PATH: model.safetensors truncated")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    truncate(ckpt(out, 4) / "model.safetensors", 0.9)
    return args, out, [str(ckpt(out, 4) / "model.safetensors")]


@case("checkpoint", "resume PATH: one byte of optimizer.pt flipped")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    flip(ckpt(out, 4) / "optimizer.pt")
    return args, out, [str(ckpt(out, 4) / "optimizer.pt")]


@case("checkpoint", "resume PATH: torn completion marker")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    (ckpt(out, 4) / "COMPLETE").write_text('{"step": 4, "fi')
    return args, out, [str(ckpt(out, 4) / "COMPLETE")]


@case("checkpoint", "resume PATH: RNG state file deleted")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    (ckpt(out, 4) / "rng_rank00000.pt").unlink()
    return args, out, ["rng_rank00000.pt"]


@case("checkpoint", "resume PATH: a half-written checkpoint (no marker)")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004")
    (ckpt(out, 4) / "COMPLETE").unlink()
    return args, out, [str(ckpt(out, 4))]


@case("checkpoint", "resume PATH: weights resealed with NaN (never trained on, never saved)")
def _(ws, d):
    from safetensors.numpy import load_file, save_file

    args, out = resume(ws, d, "step_00000004")
    path = ckpt(out, 4) / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = float("nan")
    save_file(tensors, str(path))
    reseal_checkpoint(ckpt(out, 4), "model.safetensors")
    return args, out, [str(path), "NaN"]


@case("checkpoint", "resume PATH: another learning rate than the checkpoint's")
def _(ws, d):
    args, out = resume(ws, d, "step_00000004", "--learning_rate", "2e-3")
    return args, out, [str(ckpt(out, 4)), "learning_rate"]


@case("checkpoint", "resume auto: newest model.safetensors truncated (falls back)", expect="ok")
def _(ws, d):
    args, out = resume(ws, d, "auto")
    truncate(ckpt(out, 4) / "model.safetensors", 0.9)
    return args, out, ["skipping checkpoint step_00000004", "model.safetensors", "step_00000002 at step 2"]


@case("checkpoint", "resume auto: every checkpoint damaged (starts over, says why)", expect="ok")
def _(ws, d):
    args, out = resume(ws, d, "auto")
    flip(ckpt(out, 4) / "optimizer.pt")
    (ckpt(out, 2) / "trainer_state.json").write_text("{")
    return args, out, ["skipping checkpoint step_00000004", "skipping checkpoint step_00000002",
                       "starting from scratch"]


# -- inputs ----------------------------------------------------------------------------------------------
@case("input", "train --beta inf")
def _(ws, d):
    return (*train(ws, d, ws.train_store, "--beta", "inf"), ["beta"])


@case("input", "train --learning_rate nan")
def _(ws, d):
    return (*train(ws, d, ws.train_store, "--learning_rate", "nan"), ["learning_rate"])


@case("input", "train --max_grad_norm -inf")
def _(ws, d):
    return (*train(ws, d, ws.train_store, "--max_grad_norm=-inf"), ["max_grad_norm", "finite"])


@case("input", "train: beta: .nan in a YAML config")
def _(ws, d):
    (cfg := d / "run.yaml").write_text("beta: .nan\n")
    args, out = train(ws, d, ws.train_store)
    at = args.index("--beta")
    return [args[0], "--config", str(cfg), *args[1:at], *args[at + 2:]], out, ["beta", "run.yaml"]


@case("input", "train: a learning rate that makes the loss NaN (no model written)")
def _(ws, d):
    args, out = train(ws, d, ws.train_store, "--learning_rate", "1e30", "--max_train_steps", "4")
    return args, out, ["step 2", "not finite"]


@case("input", "score: the dataset file does not exist")
def _(ws, d):
    return ws.score_args(d / "store", "--dataset", str(d / "missing.jsonl")), None, ["missing.jsonl"]


@case("input", "score: dataset JSONL with a torn last line")
def _(ws, d):
    text = ws.train_data.read_text()
    (data := d / "torn.jsonl").write_text(text[:len(text) - 40])
    return ws.score_args(d / "store", "--dataset", str(data)), None, ["torn.jsonl", "line"]


@case("input", "score: dataset that is not JSON")
def _(ws, d):
    (data := d / "junk.jsonl").write_bytes(b"\x00\x01 binary junk\n")
    return ws.score_args(d / "store", "--dataset", str(data)), None, ["junk.jsonl", "line 1"]


@case("input", "score: a row without `rejected`")
def _(ws, d):
    rows = [json.loads(line) for line in ws.train_data.read_text().splitlines()]
    del rows[3]["rejected"]
    (data := d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws.score_args(d / "store", "--dataset", str(data)), None, ["rows.jsonl", "line 4"]


@case("input", "score: a row whose chosen and rejected are identical")
def _(ws, d):
    rows = [json.loads(line) for line in ws.train_data.read_text().splitlines()]
    rows[5]["rejected"] = rows[5]["chosen"]
    (data := d / "same.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws.score_args(d / "store", "--dataset", str(data)), None, ["same.jsonl", "line 6"]


@case("input", "score: an empty dataset file")
def _(ws, d):
    (data := d / "empty.jsonl").write_text("")
    return ws.score_args(d / "store", "--dataset", str(data)), None, ["empty.jsonl"]


@case("input", "score: a torn YAML config")
def _(ws, d):
    (cfg := d / "torn.yaml").write_text("batch_size: [2,\n")
    return ["score", "--config", str(cfg), *ws.score_args(d / "store")[1:]], None, ["torn.yaml"]


@case("input", "score: a YAML key no command knows")
def _(ws, d):
    (cfg := d / "typo.yaml").write_text("batch_sise: 2\n")
    return ["score", "--config", str(cfg), *ws.score_args(d / "store")[1:]], None, ["batch_sise"]


def model_copy(ws: Workspace, d: Path) -> Path:
    return Path(shutil.copytree(ws.model, d / "model"))


def score_with(ws: Workspace, d: Path, model: Path) -> list[str]:
    """The workspace's score command with ``model`` (a damaged copy) as the reference."""
    args = ws.score_args(d / "store")
    args[args.index("--model_name_or_path") + 1] = str(model)
    return args


@case("input", "score: model config.json torn")
def _(ws, d):
    model = model_copy(ws, d)
    (model / "config.json").write_text('{"architectures": ["Llama')
    return score_with(ws, d, model), None, ["config.json"]


@case("input", "score: model weights deleted")
def _(ws, d):
    model = model_copy(ws, d)
    (model / "model.safetensors").unlink()
    return score_with(ws, d, model), None, [str(model)]


@case("input", "score: model weights truncated")
def _(ws, d):
    model = model_copy(ws, d)
    truncate(model / "model.safetensors", 0.7)
    return score_with(ws, d, model), None, ["model.safetensors"]


@case("input", "train: model weights truncated")
def _(ws, d):
    model = model_copy(ws, d)
    truncate(model / "model.safetensors", 0.7)
    args, out = train(ws, d, ws.train_store)
    args[args.index("--model_name_or_path") + 1] = str(model)
    return args, out, ["model.safetensors"]


@case("input", "train: output_dir is a file")
def _(ws, d):
    (out := d / "out").write_text("not a folder")
    args, _ = train(ws, d, ws.train_store)
    return args, None, [str(out)]


# -- full disks ------------------------------------------------------------------------------------------
@case("disk", "score onto a full disk (32 KiB tmpfs)")
def _(ws, d):
    return ws.score_args(d / "disk" / "store", "--save_token_logps", "true"), None, ["no space left on device"], \
        ("32k", d / "disk")


@case("disk", "train: a checkpoint onto a full disk (1 MiB tmpfs)")
def _(ws, d):
    args = ws.train_args(d / "disk" / "out", "--max_train_steps", "3")
    return args, None, ["no space left on device while writing checkpoint step 2"], ("1M", d / "disk")


@case("disk", "train: the final model onto a full disk (1 MiB tmpfs)")
def _(ws, d):
    args = ws.train_args(d / "disk" / "out", "--max_train_steps", "2", "--checkpointing_steps", "none")
    return args, None, ["no space left on device while saving the model"], ("1M", d / "disk")

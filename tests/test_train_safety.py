"""Stage two never saves a broken model and survives what clusters do to it: non-finite updates, damaged
checkpoints, preemption signals, full disks, output folders holding an older run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import conversational_rows, run_on_small_disk, run_tolerance, score_rows
from safetensors.torch import load_file

from dpocache.cli import main
from dpocache.preemption import PREEMPTED_EXIT_CODE
from dpocache.stages.train.tracking import read_jsonl


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("safety_store"), tiny_model_dir, conversational_rows(24, seed=17),
                      "--store_dataset", "d")


def args(model, store, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", *extra]


def losses(out):
    return [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl")]


def finite(path):
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


def test_nonfinite_update_stops_training_naming_the_step(tiny_model_dir, store, tmp_path, capsys):
    """A learning rate of 1e30 makes the second step's loss NaN: training stops there, names the step and the
    examples, never applies the update, and writes no model; the checkpoint before it holds finite weights."""
    out = tmp_path / "out"
    code = main(args(tiny_model_dir, store, out, "--learning_rate", "1e30", "--max_train_steps", "6",
                     "--checkpointing_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2
    assert "step 2: the loss or the gradient norm is not finite" in err and "Traceback" not in err
    assert "Examples of that step: " in err
    assert not (out / "model.safetensors").exists()
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000001"]
    assert finite(ckpts[0] / "model.safetensors")


def test_nonfinite_steps_can_be_skipped_and_are_counted(tiny_model_dir, store, tmp_path):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, "--learning_rate", "1e30", "--max_train_steps", "4",
                     "--skip_nonfinite_steps", "10", "--checkpointing_steps", "none")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["nonfinite_steps_skipped"] for r in rows] == [0, 1, 2, 3]
    assert finite(out / "model.safetensors")  # the skipped updates never reached the weights


@pytest.mark.slow
def test_damaged_checkpoint_is_skipped_by_auto_resume(tiny_model_dir, store, tmp_path, capsys):
    common = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--keep_last_n_checkpoints", "3")
    full = tmp_path / "full"
    assert main(args(tiny_model_dir, store, full, *common)) == 0
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, *common)) == 0
    newest = out / "checkpoints" / "step_00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated after it was marked complete
    (out / "model.safetensors").unlink()
    capsys.readouterr()

    # an explicit path that does not verify is an error naming the file
    assert main(args(tiny_model_dir, store, out, *common, "--resume_from_checkpoint", str(newest))) == 2
    assert f"{weights}: truncated or altered" in capsys.readouterr().err

    assert main(args(tiny_model_dir, store, out, *common, "--resume_from_checkpoint", "auto")) == 0
    printed = capsys.readouterr().out
    assert "skipping checkpoint step_00000004" in printed and "truncated or altered" in printed
    assert "resumed from" in printed and "step_00000002 at step 2" in printed
    assert losses(out) == pytest.approx(losses(full), abs=run_tolerance(1e-6, 1e-4))


def test_torn_trainer_state_is_named(tiny_model_dir, store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "3", "--checkpointing_steps", "2")) == 0
    ckpt = out / "checkpoints" / "step_00000002"
    (ckpt / "trainer_state.json").write_text('{"step": 2, "sched')
    capsys.readouterr()
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "3", "--resume_from_checkpoint",
                     str(ckpt))) == 2
    err = capsys.readouterr().err
    assert "trainer_state.json" in err and "Traceback" not in err


def test_checkpoint_resealed_with_nan_weights_is_refused_naming_the_file(tiny_model_dir, store, tmp_path, capsys):
    """dpocache never writes non-finite weights; a checkpoint altered to hold them (its marker resealed) is refused
    on resume, naming the file and the weight, and nothing is trained or saved."""
    import hashlib

    from safetensors.torch import save_file

    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "3", "--checkpointing_steps", "2")) == 0
    ckpt = out / "checkpoints" / "step_00000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"))
    marker = json.loads((ckpt / "COMPLETE").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    marker["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "COMPLETE").write_text(json.dumps(marker))
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "3", "--resume_from_checkpoint",
                     str(ckpt))) == 2
    err = capsys.readouterr().err
    assert f"{ckpt / 'model.safetensors'}: weight {name} holds NaN or inf" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_output_dir_with_results_is_refused_then_overwritten(tiny_model_dir, store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "1")) == 0
    (out / "plots").mkdir()
    (out / "plots" / "old.png").write_bytes(b"png")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "2")) == 2
    assert "already holds a run's results" in capsys.readouterr().err
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "2", "--overwrite_output_dir")) == 0
    assert not (out / "plots" / "old.png").exists() and (out / "notes.txt").read_text() == "mine"
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert json.loads((out / "summary.json").read_text())["train_steps"] == 2


def test_saved_files_are_readable_and_config_keeps_use_cache(tiny_model_dir, store, tmp_path):
    out = tmp_path / "out"
    assert main(args(tiny_model_dir, store, out, "--max_train_steps", "1")) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    base = json.loads((tiny_model_dir / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()).get("use_cache") == base.get("use_cache", True)


def wait_for_metrics(path, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("training did not log in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoints_and_resumes_exactly(tiny_model_dir, store, tmp_path, sig):
    common = ("--per_device_train_batch_size", "1", "--max_train_steps", "40", "--checkpointing_steps", "none")
    full = tmp_path / "full"
    assert main(args(tiny_model_dir, store, full, *common)) == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dpocache.cli", *args(tiny_model_dir, store, out, *common)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(out / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert f"preempted: {signal.Signals(sig).name} after step" in err and "Traceback" not in err
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (out / "model.safetensors").exists()
    step = int(ckpts[0].name.split("_")[1])
    assert 3 <= step < 40

    assert main(args(tiny_model_dir, store, out, *common, "--resume_from_checkpoint", "auto")) == 0
    assert losses(out) == pytest.approx(losses(full), abs=run_tolerance(1e-6, 1e-4))


@pytest.mark.slow
def test_full_disk_during_checkpoint_is_one_line_and_leaves_nothing(tiny_model_dir, store, tmp_path):
    out = tmp_path / "disk" / "out"
    done = run_on_small_disk(tmp_path / "disk", "1M", [
        sys.executable, "-m", "dpocache.cli",
        *args(tiny_model_dir, store, out, "--max_train_steps", "3", "--checkpointing_steps", "2")])
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left on device while writing checkpoint step 2" in lines[0]
    assert "needed" in lines[0] and "Traceback" not in done.stderr
    assert "LEFT:" in done.stdout and ".tmp-" not in done.stdout.split("LEFT:")[1]

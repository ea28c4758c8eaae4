"""Stage two in depth: accumulation equivalence, exact resume after SIGKILL, pruning, settings checks."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import conversational_rows, score_rows

from dpocache.cli import main
from dpocache.stages.train.checkpoint import complete_checkpoints
from dpocache.stages.train.tracking import read_jsonl


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("train_store"), tiny_model_dir, conversational_rows(32, seed=3),
                      "--store_dataset", "d")


def train_args(model, store, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--logging_steps", "1", *extra]


def losses(out):
    return [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl")]


def test_accumulation_is_a_larger_batch(tiny_model_dir, scored_store, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_args(tiny_model_dir, scored_store, a, "--per_device_train_batch_size", "8",
                           "--gradient_accumulation_steps", "1", "--max_train_steps", "3")) == 0
    assert main(train_args(tiny_model_dir, scored_store, b, "--per_device_train_batch_size", "1",
                           "--gradient_accumulation_steps", "8", "--max_train_steps", "3")) == 0
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, abs=1e-5)
    assert la[0] != pytest.approx(la[2], abs=1e-4)  # training moved


def test_same_seed_is_bit_reproducible(tiny_model_dir, scored_store, tmp_path):
    for name in ("x", "y"):
        assert main(train_args(tiny_model_dir, scored_store, tmp_path / name, "--per_device_train_batch_size",
                               "4", "--max_train_steps", "3")) == 0
    assert losses(tmp_path / "x") == losses(tmp_path / "y")


def test_resume_after_sigkill_reproduces_losses(tiny_model_dir, scored_store, tmp_path):
    common = ["--per_device_train_batch_size", "4", "--num_epochs", "2", "--checkpointing_steps", "2",
              "--keep_last_n_checkpoints", "2"]
    full = tmp_path / "full"
    assert main(train_args(tiny_model_dir, scored_store, full, *common)) == 0
    reference = losses(full)
    assert len(reference) == 16

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dpocache.cli", *train_args(tiny_model_dir, scored_store, out, *common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(out)
        if done and int(done[-1].name.split("_")[1]) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_jsonl(out / "metrics.jsonl"))
    assert killed_at < 16
    # pruning runs after a new checkpoint is complete: a kill in between may leave one extra
    assert len(complete_checkpoints(out)) <= 3

    assert main(train_args(tiny_model_dir, scored_store, out, *common, "--resume_from_checkpoint", "auto")) == 0
    assert losses(out) == reference  # exact, fp32 on CPU
    assert [r["training_step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 17))
    assert len(complete_checkpoints(out)) <= 2  # the resumed run pruned down to the newest two


def test_resume_with_other_settings_names_the_field(tiny_model_dir, scored_store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(tiny_model_dir, scored_store, out, "--per_device_train_batch_size", "4",
                           "--checkpointing_steps", "1", "--max_train_steps", "3")) == 0
    assert complete_checkpoints(out)
    assert main(train_args(tiny_model_dir, scored_store, out, "--per_device_train_batch_size", "4",
                           "--max_train_steps", "3", "--loss_type", "ipo",
                           "--resume_from_checkpoint", "auto")) == 2
    assert "loss_type" in capsys.readouterr().err

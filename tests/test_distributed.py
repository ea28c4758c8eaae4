"""Real multi-process runs on CPU (gloo): accelerate DDP equals one process with the same global batch."""

import os
import subprocess
import sys

import pytest

from conftest import conversational_rows, write_jsonl
from dpocache.cli import main
from dpocache.tracking import read_jsonl


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp_store")
    data = write_jsonl(root / "train.jsonl", conversational_rows(24, seed=5))
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data),
                 "--store", str(root / "store")]) == 0
    return root / "store"


def accelerate(args, *, processes=2, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29511", *extra, "-m", "dpocache.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def train_args(model, store, out, per_device):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", str(per_device), "--max_train_steps", "3",
            "--checkpointing_steps", "2"]


def test_ddp_two_processes_match_one(tiny_model_dir, store, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(train_args(tiny_model_dir, store, single, 4)) == 0
    accelerate(train_args(tiny_model_dir, store, ddp, 2))
    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "logps/chosen", "rewards/margin", "rewards/accuracy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
    # only rank 0 wrote outputs: one metrics file, one checkpoint directory, no temporary leftovers
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_00000002"]
    assert (ddp / "model.safetensors").is_file()

"""Real multi-process runs on CPU (gloo): accelerate DDP equals one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import conversational_rows, score_rows, write_jsonl

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main
from dpocache.stages.train.tracking import read_jsonl


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("ddp_store"), tiny_model_dir, conversational_rows(24, seed=5))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate(args, *, processes=2, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *extra, "-m", "dpocache.cli", *args]
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



def test_ddp_bco_pair_reward_mean_is_shared_by_the_processes(tiny_model_dir, store, tmp_path):
    """bco_pair's running reward mean is averaged across processes every micro-batch: two processes of 2 pairs
    train exactly as one process of 4 (without the average each rank would shift by its own rewards)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    extra = ["--loss_type", "sigmoid,bco_pair", "--loss_weights", "0.5,1.0", "--beta", "5", "--learning_rate", "1e-2"]
    assert main(train_args(tiny_model_dir, store, single, 4) + extra) == 0
    accelerate(train_args(tiny_model_dir, store, ddp, 2) + extra)
    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "loss/bco_pair", "loss/sigmoid", "rewards/margin"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), key  # per-rank shifts: off by ~10%

def test_run_under_two_processes(tiny_model_dir, tmp_path):
    """`dpocache run` launched on 2 processes: each rank scores its half of the examples (chunks of 2), the
    summary counts every rank's work, DDP training, rank 0 evaluates the held-out pairs and writes the summary;
    a second launch reuses the whole store."""
    train = write_jsonl(tmp_path / "train.jsonl", conversational_rows(16, seed=31))
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(6, seed=32))

    def args(out):
        return ["run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train), "--heldout_dataset",
                str(held), "--store", str(tmp_path / "store"), "--output_dir", str(out), "--loss_type", "dpo",
                "--beta", "0.3", "--learning_rate", "3e-3", "--warmup_ratio", "0", "--per_device_train_batch_size",
                "2", "--max_train_steps", "3", "--rows_per_shard", "2"]

    done = accelerate(args(tmp_path / "out"))
    # rank 0's share: half of each list (8 of 16, 3 of 6), the other half is rank 1's
    assert "(rank 0/2: 8 of the 16 examples)" in done.stdout and "(rank 0/2: 3 of the 6 examples)" in done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["examples_scored"] == 16 + 6 and summary["examples_reused"] == 0
    assert summary["stage_one_skipped"] is False
    store = ReferenceStore.open(tmp_path / "store")
    assert store.num_rows() == 16 + 6 and len(store.shards) == 4 + 4 + 2 * 2  # per rank: 8 -> 4 chunks, 3 -> 2
    assert summary["heldout_examples"] == 6 and 0.0 <= summary["heldout_reward_accuracy"] <= 1.0
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 3
    accelerate(args(tmp_path / "out2"))
    again = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert again["stage_one_skipped"] is True and again["examples_reused"] == 16 + 6 and again["examples_scored"] == 0

"""FSDP2 (PyTorch's fully_shard) through accelerate, with real 2-process CPU runs (gloo): per-step metrics equal one
process with the same global batch, the saved model is gathered and complete, checkpoints hold one optimizer shard
per rank and a resume continues exactly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import conversational_rows, cpu_env, free_port, score_rows
from transformers import AutoModelForCausalLM

from dpocache.stages.train.tracking import read_jsonl

CONFIG = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "accelerate_fsdp2.yaml"
KEYS = ("train_loss", "logps/chosen", "logps/rejected", "rewards/margin", "rewards/accuracy")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("fsdp_store"), tiny_model_dir, conversational_rows(24, seed=13))


def train_args(model, store, out, per_device, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "2e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", str(per_device), "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--max_grad_norm", "1.0", *extra]


def fsdp_launch(args: list[str]) -> subprocess.CompletedProcess:
    env = cpu_env()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "dpocache.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


@pytest.mark.slow
def test_fsdp2_matches_single_process_and_resumes(tiny_model_dir, store, tmp_path):
    single, out = tmp_path / "single", tmp_path / "fsdp"
    done = subprocess.run([sys.executable, "-m", "dpocache.cli", *train_args(tiny_model_dir, store, single, 4)],
                          capture_output=True, text=True, env=cpu_env(), timeout=900)  # the CPU, as the launch
    assert done.returncode == 0, done.stderr[-3000:]
    done = fsdp_launch(train_args(tiny_model_dir, store, out, 2))
    assert "engine fsdp2 x 2 process(es)" in done.stdout

    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["training_step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (ra["training_step"], key)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)

    fsdp_model = AutoModelForCausalLM.from_pretrained(out)
    ref_model = AutoModelForCausalLM.from_pretrained(single)
    for (name, p), (_, q) in zip(ref_model.named_parameters(), fsdp_model.named_parameters()):
        assert p.shape == q.shape and torch.allclose(p, q, atol=1e-5), name

    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "COMPLETE", "model.safetensors", "optimizer_rank00000.safetensors", "optimizer_rank00001.safetensors",
        "rng_rank00000.pt", "rng_rank00001.pt", "trainer_state.json"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["settings"]["engine"] == "fsdp2"

    resumed = tmp_path / "resumed"
    fsdp_launch(train_args(tiny_model_dir, store, resumed, 2, "--resume_from_checkpoint", str(ckpt)))
    c = read_jsonl(resumed / "metrics.jsonl")
    assert [r["training_step"] for r in c] == [3, 4]
    for rb, rc in zip(b[2:], c):
        for key in KEYS:
            assert rc[key] == pytest.approx(rb[key], abs=1e-6), (rb["training_step"], key)

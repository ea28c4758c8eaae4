"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate's plugin: real 2-process CPU runs (gloo).

Each stage must give the per-step losses of a single process with the same global batch, save a model
that loads in transformers with the same weights (ZeRO-3: gathered from both ranks), write outputs from
rank 0 only, and resume exactly from its per-rank (partitioned) optimizer checkpoint. Every launch and the
single-process reference compute on the CPU (gloo), also on a machine with a GPU.
"""

import json
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (make test installs it; a missing install must fail, not skip)
import pytest
import torch
from conftest import assert_heldout_matches, conversational_rows, cpu_env, free_port, score_rows, write_jsonl
from transformers import AutoModelForCausalLM

from dpocache.stages.train.tracking import read_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
KEYS = ("train_loss", "logps/chosen", "logps/rejected", "rewards/margin", "rewards/accuracy")


pytestmark = pytest.mark.slow  # multi-process launches


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("ds_store"), tiny_model_dir, conversational_rows(24, seed=11))


def train_args(model, store, out, per_device, *extra):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "2e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", str(per_device), "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--max_grad_norm", "1.0", *extra]


def deepspeed_launch(stage: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
           "--deepspeed_config_file", str(CONFIGS / f"ds_zero{stage}.json"), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "dpocache.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run([sys.executable, "-m", "dpocache.cli", *train_args(tiny_model_dir, store, out, 4)],
                          capture_output=True, text=True, env=cpu_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process_and_resumes(stage, tiny_model_dir, store, single_run, tmp_path):
    out = tmp_path / f"zero{stage}"
    deepspeed_launch(stage, train_args(tiny_model_dir, store, out, 2))

    # same global batch (2 ranks x 2 pairs == 1 process x 4 pairs): same per-step metrics
    a, b = read_jsonl(single_run / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["training_step"] for r in b] == [1, 2, 3, 4]  # one writer: rank 0
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), (stage, ra["training_step"], key)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)

    # the saved model is a complete HF model (ZeRO-3: gathered) equal to the single-process result
    ds_model = AutoModelForCausalLM.from_pretrained(out)
    ref_model = AutoModelForCausalLM.from_pretrained(single_run)
    for (name, p), (_, q) in zip(ref_model.named_parameters(), ds_model.named_parameters()):
        assert p.shape == q.shape and torch.allclose(p, q, atol=1e-5), name

    # the checkpoint holds one optimizer partition and one RNG state per rank
    ckpt = out / "checkpoints" / "step_00000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["COMPLETE", "model.safetensors", "optimizer_rank00000.safetensors",
                     "optimizer_rank00001.safetensors", "rng_rank00000.pt", "rng_rank00001.pt",
                     "trainer_state.json"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["settings"]["engine"] == f"deepspeed-zero{stage}"

    # resuming from step 2 reproduces steps 3 and 4 exactly
    resumed = tmp_path / f"zero{stage}-resumed"
    deepspeed_launch(stage, train_args(tiny_model_dir, store, resumed, 2, "--resume_from_checkpoint", str(ckpt)))
    c = read_jsonl(resumed / "metrics.jsonl")
    assert [r["training_step"] for r in c] == [3, 4]
    for rb, rc in zip(b[2:], c):
        for key in KEYS:
            assert rc[key] == pytest.approx(rb[key], abs=1e-6), (stage, rb["training_step"], key)


def test_deepspeed_config_conflicts_are_named(tiny_model_dir, store, tmp_path):
    bad = tmp_path / "ds.json"
    config = json.loads((CONFIGS / "ds_zero2.json").read_text())
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    bad.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(bad), "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "dpocache.cli",
           *train_args(tiny_model_dir, store, tmp_path / "o", 2)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert done.returncode != 0
    assert "remove the 'optimizer' section" in done.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_run_under_zero3_evaluates_on_every_rank(tiny_model_dir, tmp_path):
    """`dpocache run` under ZeRO-3: the held-out forwards gather partitioned parameters, so every rank runs
    them; rank 0 records the figures."""
    train = write_jsonl(tmp_path / "train.jsonl", conversational_rows(8, seed=41))
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(4, seed=42))
    deepspeed_launch(3, ["run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train),
                         "--heldout_dataset", str(held), "--store", str(tmp_path / "store"), "--output_dir",
                         str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--max_train_steps", "2"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["heldout_examples"] == 4
    # the gathered model holds every parameter of the base model, trained ...
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}
    assert any(not torch.equal(saved[k], base[k]) for k in base)
    # ... and it is the model the ranks evaluated: the held-out figures recomputed from it match
    assert_heldout_matches(tmp_path / "out")

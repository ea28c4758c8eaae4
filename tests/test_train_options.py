"""Stage-two options checked by their effect, through the command line and the saved outputs: the
learning-rate schedules (the logged rate against the formula, and the rate really applied), AdamW weight
decay, checkpoints at epoch ends; and the exit codes of `inspect` (sound store, damaged store, no store)."""

import math
import shutil

import pytest
import torch
from conftest import conversational_rows, run_tolerance, score_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpocache.cli import main
from dpocache.stages.train.tracking import read_jsonl

PEAK = 1e-3


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("options"), tiny_model_dir, conversational_rows(16, seed=17))


def train(model, store, out, *extra):
    assert main(["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
                 "--loss_type", "dpo", "--beta", "0.2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                 *extra]) == 0
    return read_jsonl(out / "metrics.jsonl")


def scheduled(kind: str, k: int, total: int, warmup: int) -> float:
    """The rate of optimizer step k + 1 (k steps taken), written from the schedules' definitions: linear
    warm-up from 0 over ``warmup`` steps, then linear decay to 0 / half a cosine to 0 / constant."""
    if k < warmup:
        return PEAK * k / warmup
    progress = (k - warmup) / (total - warmup)
    return PEAK * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "constant": 1.0}[kind]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_learning_rate_schedule_follows_the_formula(kind, tiny_model_dir, store, tmp_path):
    total, ratio = 10, 0.3  # 3 warm-up steps (int(0.3 * 10))
    rows = train(tiny_model_dir, store, tmp_path / kind, "--learning_rate", str(PEAK), "--lr_scheduler_type", kind,
                 "--warmup_ratio", str(ratio), "--max_train_steps", str(total), "--checkpointing_steps", "1",
                 "--keep_last_n_checkpoints", "20")
    assert [r["training_step"] for r in rows] == list(range(1, total + 1))
    logged = [r["learning_rate"] for r in rows]
    assert logged == pytest.approx([scheduled(kind, k, total, 3) for k in range(total)], rel=1e-9, abs=1e-15)
    assert logged[0] == 0.0 and logged[3] == pytest.approx(PEAK)  # warm-up from 0; the peak after it
    # the rate is applied, not only logged: step 1 ran at rate 0 and left every weight as it was
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    ckpt = tmp_path / kind / "checkpoints"
    after1, after2 = (load_file(str(ckpt / f"step_0000000{s}" / "model.safetensors")) for s in (1, 2))
    assert all(torch.equal(after1[k], start[k]) for k in after1)
    assert any(not torch.equal(after2[k], start[k]) for k in after2)


def test_weight_decay_shrinks_weights_by_lr_times_decay(tiny_model_dir, store, tmp_path):
    """One AdamW step from the same weights on the same batch: the Adam update is identical with and without
    decay, so the two results differ exactly by the decoupled decay term -lr * weight_decay * w0."""
    lr, wd = 1e-2, 0.1
    common = ["--learning_rate", str(lr), "--warmup_ratio", "0", "--max_train_steps", "1", "--checkpointing_steps",
              "none"]
    train(tiny_model_dir, store, tmp_path / "decay", *common, "--weight_decay", str(wd))
    train(tiny_model_dir, store, tmp_path / "plain", *common)
    start, decayed, plain = (AutoModelForCausalLM.from_pretrained(p).state_dict()
                             for p in (tiny_model_dir, tmp_path / "decay", tmp_path / "plain"))
    matrices = [k for k, v in start.items() if v.dim() == 2]
    assert matrices
    for k in matrices:
        assert not torch.equal(plain[k], start[k]), k  # the step moved the weights
        expected = -lr * wd * start[k]
        assert torch.allclose(decayed[k] - plain[k], expected, rtol=1e-3, atol=run_tolerance(1e-8, 1e-7)), k


@pytest.mark.slow
def test_checkpoint_at_epoch_end(tiny_model_dir, store, tmp_path):
    """16 pairs in batches of 4: 4 steps an epoch, 3 epochs. The last step saves the final model, not a
    checkpoint; --checkpointing_steps adds its own; a resume from an epoch end continues exactly."""
    common = ["--learning_rate", "1e-3", "--warmup_ratio", "0", "--num_epochs", "3", "--keep_last_n_checkpoints",
              "10"]

    def checkpoints(out):
        root = out / "checkpoints"
        return sorted(p.name for p in root.iterdir()) if root.exists() else []

    rows = train(tiny_model_dir, store, tmp_path / "epochs", *common, "--checkpoint_at_epoch_end",
                 "--checkpointing_steps", "none")
    assert len(rows) == 12
    assert checkpoints(tmp_path / "epochs") == ["step_00000004", "step_00000008"]
    assert [rows[s - 1]["epoch"] for s in (4, 8, 12)] == [1.0, 2.0, 3.0]
    train(tiny_model_dir, store, tmp_path / "none", *common, "--checkpointing_steps", "none")
    assert checkpoints(tmp_path / "none") == []
    train(tiny_model_dir, store, tmp_path / "both", *common, "--checkpoint_at_epoch_end", "--checkpointing_steps", "3")
    assert checkpoints(tmp_path / "both") == [f"step_0000000{s}" for s in (3, 4, 6, 8, 9)]

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "epochs", resumed)
    again = train(tiny_model_dir, store, resumed, *common, "--checkpoint_at_epoch_end", "--checkpointing_steps",
                  "none", "--resume_from_checkpoint", str(resumed / "checkpoints" / "step_00000004"))
    assert [r["training_step"] for r in again] == list(range(1, 13))
    tol = run_tolerance(0.0, 1e-5)
    for a, b in zip(rows[4:], again[4:]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=tol) and b["epoch"] == a["epoch"]


def test_inspect_exit_codes(store, tmp_path, capsys):
    assert main(["inspect", str(store), "--verify"]) == 0
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    shard = sorted((damaged / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(damaged), "--verify"]) == 1
    assert "checksum mismatch" in capsys.readouterr().out
    missing = tmp_path / "no-store"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpocache inspect: error: ") and str(missing) in err and "Traceback" not in err

"""Reference-free losses (simpo) need no store: `train --dataset`, `run` without stage one, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import conversational_rows, run_tolerance, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpocache.cli import main
from dpocache.data import DataConfig, load_preference_data
from dpocache.stages.train.checkpoint import complete_checkpoints
from dpocache.stages.train.tracking import read_jsonl

SIMPO_METRICS = ["training_step", "learning_rate", "epoch", "train_loss", "logps/chosen", "logps/rejected"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("simpo_data")
    return (write_jsonl(root / "prefs.jsonl", conversational_rows(16, seed=4)),
            write_jsonl(root / "held.jsonl", conversational_rows(8, seed=5)),
            write_jsonl(root / "other.jsonl", conversational_rows(16, seed=6)))


def simpo_args(model, dataset, out, *extra):
    return ["train", "--model_name_or_path", str(model), "--dataset", str(dataset), "--output_dir", str(out),
            "--loss_type", "simpo", "--beta", "2.0", "--learning_rate", "3e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", "4", *extra]


def losses(out):
    return [r["train_loss"] for r in read_jsonl(out / "metrics.jsonl")]


def test_simpo_trains_from_the_dataset_without_a_store(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(simpo_args(tiny_model_dir, data[0], out, "--num_epochs", "4")) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 16  # 16 pairs / 4 per step, 4 epochs
    for row in rows:
        assert all(name in row for name in SIMPO_METRICS), row
        assert not any(k.startswith("rewards/") for k in row), row
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["logps/chosen"] - rows[-1]["logps/rejected"] > rows[0]["logps/chosen"] - rows[0]["logps/rejected"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "reference-free" in card and "Reference store identity" not in card
    assert not list(tmp_path.rglob("manifest.json"))  # no store anywhere
    assert "tokenized from the data (no store)" in capsys.readouterr().out


def test_reference_losses_still_need_a_store(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(simpo_args(tiny_model_dir, data[0], out, "--loss_type", "dpo")) == 2
    err = capsys.readouterr().err
    assert "--store" in err and "loss_type dpo" in err
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
                 "--loss_type", "simpo"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_run_simpo_skips_stage_one(tiny_model_dir, data, tmp_path, capsys, _isolated_home):
    train, held, _ = data
    store, out = tmp_path / "store", tmp_path / "out"
    stores_before = sorted((_isolated_home / "stores").glob("*")) if (_isolated_home / "stores").exists() else []
    assert main(["run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train),
                 "--heldout_dataset", str(held), "--store", str(store), "--output_dir", str(out),
                 "--loss_type", "simpo", "--beta", "2.0", "--learning_rate", "3e-3", "--warmup_ratio", "0",
                 "--per_device_train_batch_size", "4", "--num_epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert not store.exists()
    stores_after = sorted((_isolated_home / "stores").glob("*")) if (_isolated_home / "stores").exists() else []
    assert stores_after == stores_before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_one_skipped"] is True and "reference-free" in summary["stage_one_skip_reason"]
    assert summary["store"] is None and summary["examples_scored"] == 0 and summary["examples"] == 16
    assert summary["train_steps"] == 8
    assert summary["heldout_reward_accuracy"] is None and summary["heldout_reward_margin"] is None
    assert summary["heldout_examples"] == 8
    assert "stage one:       skipped (the simpo loss is reference-free" in printed
    assert "to score" not in printed  # no reference scoring at all

    # the held-out numbers are the trained policy's own preferences: recompute them independently
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ds = load_preference_data(DataConfig(dataset=str(held)), tok, progress=False).dataset
    wins, margins = [], []
    with torch.no_grad():
        for row in ds:
            avg = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                logps = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
                token_logps = logps.gather(-1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(row[f"{side}_mask"][1:], dtype=torch.bool)
                avg.append(token_logps[mask].mean().item())
            wins.append(avg[0] > avg[1])
            margins.append(avg[0] - avg[1])
    assert summary["heldout_policy_preference_accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert summary["heldout_policy_logp_margin"] == pytest.approx(sum(margins) / len(margins),
                                                                  abs=run_tolerance(1e-4, 1e-3))


def test_storeless_simpo_resumes(tiny_model_dir, data, tmp_path, capsys):
    common = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--logging_steps", "1"]
    full = tmp_path / "full"
    assert main(simpo_args(tiny_model_dir, data[0], full, *common)) == 0
    reference = losses(full)
    assert len(reference) == 6 and [c.name for c in complete_checkpoints(full)][-1] == "step_00000004"

    # resume from the newest checkpoint (step 4) of a finished run: steps 5 and 6 again, exactly
    capsys.readouterr()
    assert main(simpo_args(tiny_model_dir, data[0], full, *common, "--resume_from_checkpoint", "auto")) == 0
    assert "at step 4" in capsys.readouterr().out
    assert losses(full) == pytest.approx(reference, abs=run_tolerance(0.0, 1e-5))  # exact on the CPU
    assert [r["training_step"] for r in read_jsonl(full / "metrics.jsonl")] == list(range(1, 7))

    # the settings identify the data: other pairs (same count, same steps) cannot resume this run
    assert main(simpo_args(tiny_model_dir, data[2], full, *common, "--resume_from_checkpoint", "auto")) == 2
    assert "store_identity" in capsys.readouterr().err


def test_simpo_with_a_store_still_trains_from_it(tiny_model_dir, data, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "out"
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data[0]),
                 "--store", str(store)]) == 0
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store),
                 "--output_dir", str(out), "--loss_type", "simpo", "--max_train_steps", "2",
                 "--per_device_train_batch_size", "4"]) == 0
    assert f"of {store}" in capsys.readouterr().out
    assert "Reference store identity" in (out / "README.md").read_text()
    assert len(read_jsonl(out / "metrics.jsonl")) == 2

"""End to end: `dpocache run` / `score` / `train` on a tiny real model and a small dataset."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_heldout_matches, conversational_rows, write_jsonl
from transformers import AutoModelForCausalLM

from dpocache.artifacts import ReferenceStore
from dpocache.cli import main
from dpocache.stages.train.tracking import read_jsonl

SEED_METRICS = ["training_step", "learning_rate", "epoch", "train_loss", "logps/chosen", "logps/rejected",
                "rewards/chosen", "rewards/rejected", "rewards/average", "rewards/accuracy", "rewards/margin"]


@pytest.fixture
def data_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", conversational_rows(24, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(8, seed=2))
    return train, held


def run_args(tiny_model_dir, train, held, store, out, *extra):
    return ["run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train),
            "--heldout_dataset", str(held), "--store", str(store), "--output_dir", str(out),
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "4", "--num_epochs", "4",
            "--beta", "0.5", "--warmup_ratio", "0", "--logging_steps", "2", *extra]


@pytest.mark.slow
def test_run_end_to_end_then_reuse(tiny_model_dir, data_files, tmp_path, capsys):
    train, held = data_files
    store, out = tmp_path / "store", tmp_path / "out"
    assert main(run_args(tiny_model_dir, train, held, store, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("output_dir", "store", "stage_one_skipped", "examples_scored", "train_seconds",
                "final_metrics", "heldout_reward_accuracy", "heldout_reward_margin"):
        assert key in summary
    assert summary["stage_one_skipped"] is False
    assert summary["examples_scored"] == 24 + 8
    lists = ReferenceStore.open(store).list_entries()  # the held-out list is marked as such
    assert {name: (e["count"], e["role"]) for name, e in lists.items()} == {"train": (24, "train"),
                                                                           "train-heldout": (8, "heldout")}

    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == summary["train_steps"] // 2
    for name in SEED_METRICS:
        assert all(name in r for r in rows), name
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["rewards/accuracy"] >= rows[0]["rewards/accuracy"]
    assert summary["heldout_examples"] == 8
    assert_heldout_matches(out)  # recomputed from the saved model and the store's reference values
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "learning_rate.png", "logps.png", "loss.png", "rewards.png", "rewards_accuracy.png", "rewards_margin.png"]

    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)

    out2 = tmp_path / "out2"
    assert main(run_args(tiny_model_dir, train, held, store, out2)) == 0
    again = json.loads((out2 / "summary.json").read_text())
    assert again["stage_one_skipped"] is True and again["examples_scored"] == 0
    assert "nothing to score" in capsys.readouterr().out
    # train on the store alone: the training list is the default, the held-out list is never picked
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store), "--output_dir",
                 str(tmp_path / "out3"), "--max_train_steps", "1", "--per_device_train_batch_size", "4"]) == 0
    assert "24 examples from list 'train' of" in capsys.readouterr().out


@pytest.mark.slow
def test_score_then_train_from_store_alone(tiny_model_dir, data_files, tmp_path):
    train, _ = data_files
    store, out = tmp_path / "store", tmp_path / "out"
    cmd = [sys.executable, "-m", "dpocache.cli", "score", "--model_name_or_path", str(tiny_model_dir),
           "--dataset", str(train), "--store", str(store), "--store_dataset", "mine"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "24 scored" in done.stdout
    train.unlink()  # stage two needs no raw data
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store),
                 "--output_dir", str(out), "--loss_type", "dpo", "--beta", "0.1", "--max_train_steps", "2",
                 "--per_device_train_batch_size", "4"]) == 0
    assert len(read_jsonl(out / "metrics.jsonl")) == 2
    assert (out / "model.safetensors").is_file()


def test_bad_flag_values_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(tmp_path),
                 "--beta", "-1"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    assert main(["train", "--store", str(tmp_path / "nope"), "--model_name_or_path", str(tiny_model_dir)]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_models_that_cannot_be_loaded_are_named(tokenizer_dir, data_files, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    train, _ = data_files
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(t5)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(t5)
    assert main(["score", "--model_name_or_path", str(t5), "--dataset", str(train), "--store",
                 str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{t5}: not a causal (decoder-only) language model (T5Config)" in err and "Traceback" not in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--model_name_or_path", "some-org/some-model", "--loss_type", "simpo",
                 "--dataset", str(train), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not fetch the model 'some-org/some-model' from the Hugging Face Hub: the machine is offline" \
        in err and "\n" not in err.strip()


def test_paths_of_the_wrong_kind_are_named(tiny_model_dir, data_files, tmp_path, capsys):
    train, _ = data_files
    a_file, empty = tmp_path / "a_file", tmp_path / "empty"
    a_file.write_text("x")
    empty.mkdir()
    cases = [
        (["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train), "--store", str(a_file)],
         f"{a_file}: exists and is not a directory; a store is a directory"),
        (["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(tmp_path), "--output_dir", str(a_file)],
         f"output_dir: {a_file} exists and is not a directory"),
        (["score", "--model_name_or_path", str(empty), "--dataset", str(train), "--store", str(tmp_path / "s")],
         f"{empty}: no config.json, so not a Hugging Face model directory"),
        (["score", "--model_name_or_path", str(tiny_model_dir), "--tokenizer_name_or_path", str(empty), "--dataset",
          str(train), "--store", str(tmp_path / "s2")], f"{empty}: no tokenizer files ("),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert a_file.read_text() == "x"  # nothing was written over it


def test_truncated_weights_are_named(tiny_model_dir, data_files, tmp_path, capsys):
    """A weights file cut short (an interrupted copy) is one line naming the file, in both stages."""
    import shutil

    train, _ = data_files
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for args in (["score", "--model_name_or_path", str(model), "--dataset", str(train), "--store", str(tmp_path / "s")],
                 ["train", "--model_name_or_path", str(model), "--loss_type", "simpo", "--dataset", str(train),
                  "--output_dir", str(tmp_path / "o")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"error: {weights}: unreadable weights (" in err and "truncated or corrupt" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_sequences_longer_than_the_model_embeds_are_named_before_any_compute(tokenizer_dir, tmp_path, capsys):
    """GPT-2 style learned positions (n_positions): stage one and stage two refuse longer sequences with the limit
    and the flag that fixes it; --max_seq_length makes the same data work."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = conversational_rows(6, seed=3)
    rows[2]["chosen"][-1]["content"] = "a long answer " * 30
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    models = {}
    for positions in (96, 512):
        models[positions] = tmp_path / f"gpt2_{positions}"
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2,
                                   n_positions=positions)).save_pretrained(models[positions])
        tok.save_pretrained(models[positions])
    assert main(["score", "--model_name_or_path", str(models[96]), "--dataset", str(data), "--store",
                 str(tmp_path / "s96")]) == 2
    err = capsys.readouterr().err
    assert "more than the 96 positions the model embeds (max_position_embeddings in its config); pass " \
        "--max_seq_length 96" in err
    assert not (tmp_path / "s96").exists()  # refused before a store was made
    assert main(["score", "--model_name_or_path", str(models[96]), "--dataset", str(data), "--store",
                 str(tmp_path / "s96"), "--max_seq_length", "96"]) == 0
    assert main(["score", "--model_name_or_path", str(models[512]), "--dataset", str(data), "--store",
                 str(tmp_path / "s512")]) == 0
    capsys.readouterr()
    assert main(["train", "--model_name_or_path", str(models[96]), "--store", str(tmp_path / "s512"),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "more than the 96 positions the model embeds" in capsys.readouterr().err

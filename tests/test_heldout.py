"""Held-out evaluation belongs to stage two: `train` measures a held-out list of the store and reports it (console,
summary.json, model card); `run` warns about held-out pairs that are also training pairs, or refuses them."""

import json

import pytest

from conftest import conversational_rows, score_rows, write_jsonl

from dpocache.cli import main


def test_train_evaluates_a_heldout_list_of_the_store(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    store = score_rows(tmp_path / "a", tiny_model_dir, conversational_rows(12, seed=1), "--store_dataset", "train")
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(5, seed=2))
    assert main(["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(held), "--store", str(store),
                 "--store_dataset", "held"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store), "--store_dataset",
                 "train", "--heldout_store_dataset", "held", "--output_dir", str(out), "--loss_type", "dpo",
                 "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--eval_batch_size", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out evaluation on 5 pairs" in printed and "held-out reward accuracy" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_examples"] == 5 and summary["train_steps"] == 2
    assert f"reward accuracy {summary['heldout_reward_accuracy']:.3f}" in printed
    card = (out / "README.md").read_text()
    assert "## Held-out evaluation" in card and "heldout_reward_accuracy" in card


@pytest.mark.slow
def test_run_reports_or_refuses_overlap(tiny_model_dir, tmp_path, capsys):
    rows = conversational_rows(10, seed=3)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", rows[:3] + conversational_rows(4, seed=4))

    def run(out, *extra):
        return main(["run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train), "--heldout_dataset",
                     str(held), "--store", str(tmp_path / "store"), "--output_dir", str(out), "--loss_type", "dpo",
                     "--max_train_steps", "1", "--per_device_train_batch_size", "4", *extra])

    assert run(tmp_path / "warn") == 0
    assert "3 of the 7 held-out pairs are also training pairs" in capsys.readouterr().out
    assert run(tmp_path / "error", "--heldout_overlap", "error") == 2
    err = capsys.readouterr().err
    assert "3 of the 7 held-out pairs are also training pairs" in err and "--heldout_overlap warn" in err
    assert not (tmp_path / "error" / "model.safetensors").exists()

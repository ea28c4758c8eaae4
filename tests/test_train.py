"""Stage two in depth: accumulation equivalence, exact resume after SIGKILL, pruning, settings checks.

Runs on the CPU are bit-reproducible and compared exactly; on a GPU (non-deterministic CUDA reductions) the
comparisons allow a small tolerance."""

import pytest
from conftest import conversational_rows, run_tolerance, score_rows, sigkill_when, start_pausing_cli

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
    assert la == pytest.approx(lb, abs=run_tolerance(1e-5, 1e-4))
    assert la[0] != pytest.approx(la[2], abs=1e-4)  # training moved


def test_same_seed_is_bit_reproducible(tiny_model_dir, scored_store, tmp_path):
    for name in ("x", "y"):
        assert main(train_args(tiny_model_dir, scored_store, tmp_path / name, "--per_device_train_batch_size",
                               "4", "--max_train_steps", "3")) == 0
    assert losses(tmp_path / "x") == pytest.approx(losses(tmp_path / "y"), abs=run_tolerance(0.0, 1e-5))


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses(tiny_model_dir, scored_store, tmp_path):
    """32 pairs in batches of 4 for 2 epochs: 16 steps, a checkpoint every 2, the newest 2 kept. The run is killed
    with SIGKILL at a known point: step 8's checkpoint fully written in its staging directory but not yet renamed
    into place (the process pauses there, so the kill can never come too late)."""
    common = ["--per_device_train_batch_size", "4", "--num_epochs", "2", "--checkpointing_steps", "2",
              "--keep_last_n_checkpoints", "2"]
    full = tmp_path / "full"
    assert main(train_args(tiny_model_dir, scored_store, full, *common)) == 0
    reference = losses(full)
    assert len(reference) == 16

    out, marker = tmp_path / "killed", tmp_path / "paused"
    proc = start_pausing_cli(train_args(tiny_model_dir, scored_store, out, *common), marker,
                             target="step_00000008", before=True)
    sigkill_when(proc, lambda: False, marker)
    root = out / "checkpoints"
    assert [r["training_step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 9))
    assert sorted(p.name for p in root.iterdir()) == [f".tmp-step_00000008-{proc.pid}", "step_00000004",
                                                      "step_00000006"]
    assert [p.name for p in complete_checkpoints(out)] == ["step_00000004", "step_00000006"]

    assert main(train_args(tiny_model_dir, scored_store, out, *common, "--resume_from_checkpoint", "auto")) == 0
    assert losses(out) == pytest.approx(reference, abs=run_tolerance(0.0, 1e-5))  # exact on the CPU
    assert [r["training_step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, 17))
    # the resumed run pruned down to the newest two (step 16 is the final model) and removed the dead run's staging
    assert sorted(p.name for p in root.iterdir()) == ["step_00000012", "step_00000014"]


def test_resume_with_other_settings_names_the_field(tiny_model_dir, scored_store, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(train_args(tiny_model_dir, scored_store, out, "--per_device_train_batch_size", "4",
                           "--checkpointing_steps", "1", "--max_train_steps", "3")) == 0
    assert complete_checkpoints(out)
    assert main(train_args(tiny_model_dir, scored_store, out, "--per_device_train_batch_size", "4",
                           "--max_train_steps", "3", "--loss_type", "ipo",
                           "--resume_from_checkpoint", "auto")) == 2
    assert "loss_type" in capsys.readouterr().err

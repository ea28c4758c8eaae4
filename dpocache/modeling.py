"""Loading models and tokenizers: local directories, GGUF files, and hub names (offline-aware)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dpocache.config import check, opt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


@dataclass
class ModelConfig:
    model_name_or_path: str | None = opt(
        None, "Model: a local HF directory or a hub name. Default for `run`: the embedded SmolLM2-135M-Instruct.",
        group="model")
    model_revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the model.", group="model")
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Weights/compute dtype of the model. Log-softmax is always computed in fp32.", group="model")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the model repository.",
                                  group="model")
    attn_implementation: str | None = opt(
        None, "Attention implementation passed to transformers (eager, sdpa, flash_attention_2).",
        group="model")

    def __post_init__(self):
        check(self.model_name_or_path is None or bool(str(self.model_name_or_path).strip()),
              "model_name_or_path: empty")


def _is_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tekken.json"}


def _explain(kind: str, name: str, exc: Exception) -> ModelLoadError:
    local = Path(name).expanduser()
    if local.is_dir():
        names = {f.name for f in local.iterdir()}
        if kind == "model" and "config.json" not in names and not any(n.endswith(".gguf") for n in names):
            return ModelLoadError(f"{local}: no config.json, so not a Hugging Face model directory")
        if kind == "tokenizer" and not names & _TOKENIZER_FILES:
            return ModelLoadError(f"{local}: no tokenizer files ({', '.join(sorted(_TOKENIZER_FILES))}); pass "
                                  "--tokenizer_name_or_path or save the tokenizer with the model")
    if local.exists():
        first = (str(exc).strip().splitlines() or [""])[0][:400]
        return ModelLoadError(f"could not load the {kind} from {local}: {type(exc).__name__}: {first}")
    if "/" in name and not name.startswith((".", "/")):
        how = ("the machine is offline (HF_HUB_OFFLINE is set)" if _is_offline()
               else "it is not in the local cache and the hub could not be reached")
        return ModelLoadError(
            f"could not fetch the {kind} '{name}' from the Hugging Face Hub: {how}. "
            f"Download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) "
            f"and pass the local directory instead.")
    return ModelLoadError(f"{kind} '{name}': no such local path, and not a hub name of the form org/name")


def _unreadable_weights(local: Path | None, exc: Exception) -> ModelLoadError:
    """A safetensors file that cannot be read (truncated or corrupt), named: the files of ``local`` whose header
    does not open are the culprits."""
    from safetensors import safe_open

    files = sorted(local.glob("*.safetensors")) if local is not None and local.is_dir() else [local]
    bad = []
    for file in (f for f in files if f is not None):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open names the file
            bad.append(str(file))
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ModelLoadError(f"{', '.join(bad) or local}: unreadable weights ({first}); the file is truncated or "
                          "corrupt: copy, download or convert the model again")


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), revision=revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _explain("tokenizer", str(name_or_path), exc) from None


def check_model_config(cfg: ModelConfig):
    """The model's config, read before any data work: no model at that path, or a model that is not a causal
    language model, fails fast. Returns the config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    name = str(cfg.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _explain("model", name, exc) from None
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{name}: not a causal (decoder-only) language model ({type(config).__name__}); "
                             "dpocache trains and scores models AutoModelForCausalLM can load")
    return config


def position_limit(config) -> tuple[int | None, str | None]:
    """(most positions the model can embed, the config field that says so), or (None, None) when the config
    sets no hard limit (no such field, or rotary positions with a scaling rule)."""
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        return None, None
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, field
    return None, None


def check_sequence_lengths(config, longest: int, where: str) -> None:
    """A clear error, before any compute, when ``longest`` exceeds the model's position limit."""
    from dpocache.config import ConfigError

    limit, field = position_limit(config)
    if limit is not None and longest > limit:
        raise ConfigError(f"{where}: the longest sequence has {longest} tokens, more than the {limit} positions the "
                          f"model embeds ({field} in its config); pass --max_seq_length {limit} (or less) to truncate")


def load_causal_lm(cfg: ModelConfig, *, name_or_path: str | None = None, train: bool = False):
    """Load a causal LM in ``cfg.dtype``; frozen and in eval mode unless ``train``."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path or cfg.model_name_or_path)
    kwargs = dict(revision=cfg.model_revision, dtype=DTYPES[cfg.dtype],
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _explain("model", name, exc) from None
    except SafetensorError as exc:
        raise _unreadable_weights(local_model_dir(name, cfg.model_revision), exc) from None
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if train:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def local_model_dir(name_or_path: str, revision: str | None = None) -> Path | None:
    """The directory holding the model's files: the path itself, or its hub snapshot in the local cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached locally: the caller decides what that means
        return None


def resize_for_tokenizer(model, tokenizer) -> bool:
    """Grow the embeddings when the tokenizer gained tokens (e.g. an added pad token).

    New rows are set to the mean of the existing rows, deterministically, so that the reference
    (stage one) and the policy (stage two), resized in different processes, have identical weights.
    """
    emb = model.get_input_embeddings()
    old = emb.num_embeddings  # not weight.shape: DeepSpeed ZeRO-3 partitions the weight at load time
    if len(tokenizer) <= old:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    layers = {id(x): x for x in (model.get_input_embeddings(), model.get_output_embeddings()) if x is not None}
    with gathered([layer.weight for layer in layers.values()]), torch.no_grad():
        for layer in layers.values():
            layer.weight[old:] = layer.weight[:old].mean(dim=0, keepdim=True)
    return True


def gathered(params):
    """Full parameters for in-place edits when DeepSpeed ZeRO-3 has partitioned them (else a no-op); edits made
    on rank 0 are kept and broadcast when the context exits."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

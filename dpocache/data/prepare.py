"""From a mixture specification to tokenized, hashed, deduplicated examples (``load_preference_data``)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpocache.data.config import DataConfig
from dpocache.data.errors import DataError
from dpocache.data.formats import FORMATS, detect_format, normalize
from dpocache.data.sources import read_source
from dpocache.data.tokenize import HASH_VERSION, example_hash, tokenize_side


@dataclass
class PreparedData:
    dataset: object            # datasets.Dataset of unique examples (first-occurrence order)
    hashes: list[str]          # the mixture's ordered example list (upsampled repeats included)
    stats: dict = field(default_factory=dict)
    name: str = "dataset"


def _canonical(source: str, split: str, cfg: DataConfig, stats: dict) -> list[tuple[str, str, str]]:
    """Validated rows of one source as (row label, chosen JSON, rejected JSON)."""
    out, dropped = [], Counter()
    fmt = None if cfg.dataset_format == "auto" else cfg.dataset_format
    read = 0
    for label, raw in read_source(source, split):
        read += 1
        try:
            if fmt is None:
                fmt = detect_format(raw)
                if fmt is None:
                    keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
                    raise DataError(source, label, f"cannot detect the format from columns {keys}: expected "
                                    "chosen/rejected conversations, prompt/chosen/rejected, or HH-RLHF strings "
                                    "(see --dataset_format)", reason="unknown_format")
            chosen, rejected = normalize(raw, fmt, source, label)
        except DataError as exc:
            if cfg.on_bad_row == "error":
                raise
            dropped[exc.reason] += 1
            continue
        out.append((label, json.dumps(chosen, ensure_ascii=False), json.dumps(rejected, ensure_ascii=False)))
    stats.update(source=source, split=split, format=fmt or "unknown", rows_read=read, dropped=dict(dropped))
    if read == 0:
        raise DataError(source, None, "no rows", reason="empty")
    return out


def _tokenize(rows, tokenizer, cfg: DataConfig, source: str, progress: bool):
    """Tokenize with ``datasets.map``: batched, and cached on disk under a content fingerprint."""
    import datasets

    from dpocache.artifacts.identity import dpocache_home, tokenizer_fingerprint

    digest = hashlib.sha256()
    for _, c, r in rows:
        digest.update(c.encode() + b"\0" + r.encode() + b"\0")
    fp = hashlib.sha256(json.dumps([HASH_VERSION, tokenizer_fingerprint(tokenizer), tokenizer.chat_template,
                                    cfg.mask_mode, cfg.add_bos, cfg.max_seq_length, digest.hexdigest()])
                        .encode()).hexdigest()[:32]
    cache = dpocache_home() / "tokenized"
    cache.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({"row": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                     "rejected": [r[2] for r in rows]})

    def fn(batch):
        out = {k: [] for k in ("hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask",
                               "truncated", "drop")}
        for c_json, r_json in zip(batch["chosen"], batch["rejected"]):
            c_ids, c_mask, c_tr = tokenize_side(tokenizer, json.loads(c_json), cfg.mask_mode, cfg.add_bos,
                                                cfg.max_seq_length)
            r_ids, r_mask, r_tr = tokenize_side(tokenizer, json.loads(r_json), cfg.mask_mode, cfg.add_bos,
                                                cfg.max_seq_length)
            out["hash"].append(example_hash(c_ids, c_mask, r_ids, r_mask))
            out["chosen_input_ids"].append(c_ids)
            out["chosen_mask"].append(c_mask)
            out["rejected_input_ids"].append(r_ids)
            out["rejected_mask"].append(r_mask)
            out["truncated"].append(c_tr or r_tr)
            out["drop"].append("" if sum(c_mask) and sum(r_mask) else "no_trainable_tokens_after_truncation")
        return out

    features = datasets.Features({
        "row": datasets.Value("string"), "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "hash": datasets.Value("string"), "truncated": datasets.Value("bool"), "drop": datasets.Value("string"),
        "chosen_input_ids": datasets.List(datasets.Value("int32")),
        "chosen_mask": datasets.List(datasets.Value("int8")),
        "rejected_input_ids": datasets.List(datasets.Value("int32")),
        "rejected_mask": datasets.List(datasets.Value("int8")),
    })
    if not progress:
        datasets.disable_progress_bars()
    try:
        return ds.map(fn, batched=True, batch_size=256, features=features, new_fingerprint=fp,
                      cache_file_name=str(cache / f"{fp}.arrow"), load_from_cache_file=True,
                      desc=f"tokenizing {Path(source).name}")
    finally:
        if not progress:
            datasets.enable_progress_bars()


def _select(n: int, amount: str, rng: np.random.Generator) -> np.ndarray:
    """Indices of a source's examples for an amount: fraction ("0.5", "2.0") or count ("500")."""
    target = int(round(float(amount) * n)) if "." in amount or "e" in amount.lower() else int(amount)
    full, rest = divmod(target, n) if n else (0, 0)
    parts = [np.arange(n)] * full
    if rest:
        parts.append(np.sort(rng.choice(n, size=rest, replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def mixture_name(cfg: DataConfig) -> str:
    mix = cfg.mixture()
    first = Path(mix[0]).name if mix else "dataset"
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", first.rsplit(".", 1)[0] if "." in first else first).strip("_.")
    spec = json.dumps([mix, cfg.mixer_list_splits, cfg.max_train_samples, cfg.seed])
    return f"{stem[:60] or 'dataset'}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def load_preference_data(cfg: DataConfig, tokenizer, *, progress: bool = True) -> PreparedData:
    import datasets

    if not cfg.mixture():
        raise DataError("--dataset/--mixer_list", None, "no data given", reason="config")
    if cfg.dataset_format not in ("auto",) + FORMATS:
        raise DataError("--dataset_format", None, f"unknown format {cfg.dataset_format!r}", reason="config")
    seen: dict[str, int] = {}
    parts, order, source_stats = [], [], []
    for i, (source, amount, split) in enumerate(cfg.sources()):
        st: dict = {}
        rows = _canonical(source, split, cfg, st)
        ds = _tokenize(rows, tokenizer, cfg, source, progress) if rows else None
        keep, dup, truncated = [], 0, 0
        if ds is not None:
            for k, (h, drop, tr) in enumerate(zip(ds["hash"], ds["drop"], ds["truncated"])):
                if drop:
                    st["dropped"][drop] = st["dropped"].get(drop, 0) + 1
                    continue
                truncated += bool(tr)
                if h in seen:
                    dup += 1
                    continue
                seen[h] = len(seen)
                keep.append(k)
        st.update(kept=len(keep), duplicates=dup, truncated=truncated)
        pick = _select(len(keep), amount, np.random.default_rng([cfg.seed, i]))
        st["selected"] = int(len(pick))
        source_stats.append(st)
        if keep:
            sub = ds.select(keep).remove_columns(["row", "chosen", "rejected", "truncated", "drop"])
            parts.append(sub)
            order += [sub_hash for sub_hash in (sub["hash"][j] for j in pick)]
    if cfg.max_train_samples is not None:
        order = order[: cfg.max_train_samples]
    if not order:
        raise DataError(", ".join(s for s, _, _ in cfg.sources()), None, "no usable examples left after "
                        "validation, truncation and sampling", reason="empty")
    everything = datasets.concatenate_datasets(parts)
    position = {h: k for k, h in enumerate(everything["hash"])}
    unique = list(dict.fromkeys(order))
    dataset = everything.select([position[h] for h in unique])
    totals = {
        "rows_read": sum(s["rows_read"] for s in source_stats),
        "kept": sum(s["kept"] for s in source_stats),
        "dropped": sum(sum(s["dropped"].values()) for s in source_stats),
        "duplicates": sum(s["duplicates"] for s in source_stats),
        "truncated": sum(s["truncated"] for s in source_stats),
        "examples": len(order), "unique_examples": len(unique),
    }
    return PreparedData(dataset, order, {"sources": source_stats, "totals": totals}, mixture_name(cfg))

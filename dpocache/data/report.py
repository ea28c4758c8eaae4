"""``dpocache data``: validate and summarise a dataset or mixture without any model.

:func:`summarize` returns a JSON-serialisable dict (``--json`` prints ``json.dumps`` of it);
:func:`format_summary` renders it for people.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpocache.data.config import DataConfig
from dpocache.data.prepare import mixture_name, prepare_examples, validated_rows


def _stats(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {}
    return {"count": int(arr.size), "mean": round(float(arr.mean()), 2), "min": int(arr.min()),
            "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


def _validate_only(cfg: DataConfig) -> dict:
    sources = []
    for source, amount, split in cfg.sources():
        st: dict = {"amount": amount}
        st["kept"] = sum(1 for _ in validated_rows(source, split, cfg, st))
        sources.append(st)
    return {"list_name": mixture_name(cfg), "sources": sources,
            "totals": {"rows_read": sum(s["rows_read"] for s in sources), "kept": sum(s["kept"] for s in sources),
                       "dropped": sum(sum(s["dropped"].values()) for s in sources)},
            "note": "pass --tokenizer_name_or_path for token statistics, truncation, duplicate detection and the "
                    "examples each source gives training"}


def _every_example(cfg: DataConfig) -> DataConfig:
    """``cfg`` reading each usable example of every source once, untruncated and uncapped."""
    every = [x for source in cfg.mixture()[0::2] for x in (source, "1.0")]
    return dataclasses.replace(cfg, dataset=None, mixer_list=every, max_seq_length=None, max_train_samples=None)


def _would_lose_all(mask, limit: int) -> bool:
    return not any(mask[:limit])


def summarize(cfg: DataConfig) -> dict:
    """Per source: format, rows read / kept / dropped by reason / duplicates; with a tokenizer also the
    examples selected and those training gets (``train_examples``: after truncation drops, duplicate
    removal and the ``max_train_samples`` cap, exactly as training sees them), token-length statistics of
    every usable example of the sources, untruncated (prompt, responses, whole sequences), and what
    ``max_seq_length`` does to them."""
    if not cfg.tokenizer_name_or_path:
        return _validate_only(cfg)
    from dpocache.data.templates import prepare_tokenizer
    from dpocache.modeling import load_tokenizer

    tok, _ = prepare_tokenizer(load_tokenizer(cfg.tokenizer_name_or_path), cfg)
    # The counts are exactly what training gets (truncation can drop pairs and make duplicates); the
    # token statistics cover every usable example of the sources, untruncated. Tokenizations are cached.
    dataset, _, stats = prepare_examples(cfg, tok, progress=False)
    every = _every_example(cfg)
    if (every.mixture(), every.max_seq_length, every.max_train_samples) != \
            (cfg.mixture(), cfg.max_seq_length, cfg.max_train_samples):
        dataset, _, _ = prepare_examples(every, tok, progress=False, report_drops=False)
    prompt = np.asarray(dataset["prompt_tokens"])
    chosen, rejected = np.asarray(dataset["chosen_tokens"]), np.asarray(dataset["rejected_tokens"])
    longest = np.maximum(chosen, rejected)
    summary = {"list_name": mixture_name(cfg), "max_train_samples": cfg.max_train_samples, **stats, "tokens": {
        "prompt": _stats(prompt), "chosen_response": _stats(chosen - prompt),
        "rejected_response": _stats(rejected - prompt), "longest_side": _stats(longest)}}
    if cfg.max_seq_length:
        limit = cfg.max_seq_length
        lost = sum(_would_lose_all(c, limit) or _would_lose_all(r, limit)
                   for c, r in zip(dataset["chosen_mask"], dataset["rejected_mask"]))
        summary.update(max_seq_length=limit, would_truncate=int((longest > limit).sum()), would_drop=int(lost))
    return summary


def _source_line(st: dict) -> str:
    dropped = st.get("dropped", {})
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "none"
    line = (f"{st['source']} [{st.get('split')}] format={st.get('format')} amount={st.get('amount')}: "
            f"read {st['rows_read']}, kept {st['kept']}, dropped {sum(dropped.values())} ({detail})")
    if "duplicates" in st:
        line += f", duplicates {st['duplicates']}, selected {st['selected']}"
    if "train_examples" in st:
        capped = st["train_examples"] != st["selected"]
        line += f", trains on {st['train_examples']}" + (" (after the max_train_samples cap)" if capped else "")
    return line


def format_summary(summary: dict) -> str:
    """Human-readable rendering of :func:`summarize`'s result."""
    lines = [f"list: {summary.get('list_name')}"]
    lines += [_source_line(st) for st in summary["sources"]]
    totals = {k: v for k, v in summary["totals"].items() if not isinstance(v, dict)}
    lines.append("total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    for key, st in summary.get("tokens", {}).items():
        if st:
            lines.append(f"{key} tokens: mean {st['mean']}, min {st['min']}, p50 {st['p50']:.0f}, "
                         f"p95 {st['p95']:.0f}, max {st['max']}")
    if "would_truncate" in summary:
        lines.append(f"at max_seq_length={summary['max_seq_length']}: {summary['would_truncate']} pairs would be "
                     f"truncated, {summary['would_drop']} dropped (no trainable token left)")
    if "note" in summary:
        lines.append(summary["note"])
    return "\n".join(lines)


__all__ = ["format_summary", "summarize"]

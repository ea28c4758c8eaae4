"""`dpocache data`: validate and summarise a dataset or mixture without any model."""

from __future__ import annotations

import numpy as np

from dpocache.data.config import DataConfig
from dpocache.data.errors import DataError
from dpocache.data.prepare import _canonical, load_preference_data


def _stats(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {}
    return {"mean": round(float(arr.mean()), 2), "p50": float(np.percentile(arr, 50)),
            "p95": float(np.percentile(arr, 95)), "max": int(arr.max())}


def summarize(cfg: DataConfig) -> dict:
    """Per source: format, rows read/kept/dropped by reason/duplicates; token lengths with a tokenizer."""
    if not cfg.tokenizer_name_or_path:
        sources = []
        for source, amount, split in cfg.sources():
            st: dict = {"amount": amount}
            rows = _canonical(source, split, cfg, st)
            st["kept"] = len(rows)
            sources.append(st)
        return {"sources": sources, "totals": {"rows_read": sum(s["rows_read"] for s in sources),
                                               "kept": sum(s["kept"] for s in sources)},
                "note": "pass --tokenizer_name_or_path for token statistics and duplicate detection"}
    from dpocache.data.templates import prepare_tokenizer
    from dpocache.modeling import load_tokenizer

    tok, _ = prepare_tokenizer(load_tokenizer(cfg.tokenizer_name_or_path), cfg)
    full = DataConfig(**{**cfg.__dict__, "max_seq_length": None})
    data = load_preference_data(full, tok, progress=False)
    ds = data.dataset
    prompt, chosen, rejected, longest = [], [], [], []
    for c_ids, c_mask, r_ids, r_mask in zip(ds["chosen_input_ids"], ds["chosen_mask"], ds["rejected_input_ids"],
                                            ds["rejected_mask"]):
        first = next((k for k, m in enumerate(c_mask) if m), len(c_mask))
        prompt.append(first)
        chosen.append(sum(c_mask))
        rejected.append(sum(r_mask))
        longest.append(max(len(c_ids), len(r_ids)))
    summary = {"list_name": data.name, **data.stats,
               "tokens": {"prompt": _stats(prompt), "chosen_response": _stats(chosen),
                          "rejected_response": _stats(rejected), "longest_side": _stats(longest)}}
    if cfg.max_seq_length:
        summary["would_truncate"] = int(sum(n > cfg.max_seq_length for n in longest))
        summary["max_seq_length"] = cfg.max_seq_length
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    for st in summary["sources"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(st.get("dropped", {}).items())) or "none"
        lines.append(f"{st['source']} [{st.get('split')}] format={st.get('format')}: read {st['rows_read']}, kept "
                     f"{st['kept']}, dropped {sum(st.get('dropped', {}).values())} ({dropped}), duplicates "
                     f"{st.get('duplicates', 'n/a')}")
    totals = summary["totals"]
    lines.append("total: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    for key, st in summary.get("tokens", {}).items():
        if st:
            lines.append(f"{key} tokens: mean {st['mean']}, p50 {st['p50']:.0f}, p95 {st['p95']:.0f}, max {st['max']}")
    if "would_truncate" in summary:
        lines.append(f"would be truncated at max_seq_length={summary['max_seq_length']}: {summary['would_truncate']}")
    if "note" in summary:
        lines.append(summary["note"])
    return "\n".join(lines)


__all__ = ["DataError", "format_summary", "summarize"]

"""Mixture semantics (open-instruct's): amounts, per-source selection, the ``max_train_samples`` cap and
the default list name.

The cap is shared among the sources in proportion to what each one selects (largest remainders, ties
to the earlier source), so the counts sum to the cap exactly and a small source is not cut out by a
large one before it; each source keeps a seeded sample of its selection, in selection order.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np


def parse_amount(amount: str) -> float | int:
    """``"0.5"``/``"2.0"`` (a decimal point): a fraction of the source; ``"500"``: a row count.

    Raises ValueError with a readable message for anything else (negative, zero, ``1e3``, ``abc``).
    """
    text = str(amount).strip()
    if re.fullmatch(r"\d+", text):
        value: float | int = int(text)
    elif re.fullmatch(r"\d*\.\d*", text) and text != ".":
        value = float(text)
    else:
        raise ValueError(f"amount {amount!r} is neither a fraction with a decimal point (0.5, 2.0) nor a row "
                         "count (500)")
    if value <= 0:
        raise ValueError(f"amount {amount!r} must be > 0")
    return value


def target_size(n: int, amount: str) -> int:
    """How many examples a source contributes: ``int(fraction * n)`` or the row count."""
    value = parse_amount(amount)
    return int(value * n) if isinstance(value, float) else value


def select_indices(n: int, amount: str, rng: np.random.Generator) -> np.ndarray:
    """Indices into a source of ``n`` examples: whole copies, then a seeded sample without replacement.

    ``2.5`` of 10 rows is every row twice plus 5 rows drawn at random (kept in source order); a count
    above ``n`` upsamples the same way.
    """
    target = target_size(n, amount)
    if n == 0 or target == 0:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(target, n)
    parts = [np.arange(n)] * full
    if rest:
        parts.append(np.sort(rng.choice(n, size=rest, replace=False)))
    return np.concatenate(parts).astype(np.int64)


CAP_STREAM = 1  # the cap's random draws use default_rng([seed, source_index, CAP_STREAM])


def cap_counts(selected: list[int], cap: int | None) -> list[int]:
    """Per-source counts after the cap: proportional to ``selected``, summing to ``min(cap, total)``."""
    total = sum(selected)
    if cap is None or total <= cap:
        return list(selected)
    counts = [cap * n // total for n in selected]
    by_remainder = sorted(range(len(selected)), key=lambda i: (-(cap * selected[i] % total), i))
    for i in by_remainder[: cap - sum(counts)]:
        counts[i] += 1
    return counts


def cap_selection(pick: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of a source's selected indices ``pick``: a seeded sample, kept in selection order."""
    if count >= len(pick):
        return pick
    return pick[np.sort(rng.choice(len(pick), size=count, replace=False))]


_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_COMPRESSED = (".gz", ".bz2", ".xz")
_NAME_MAX = 100


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_.=-")


def source_stem(source: str) -> str:
    """Short, file-name-safe name of a source: its file or folder name (a hub dataset: its name without the
    organisation), without data and compression suffixes."""
    stem = Path(source.rstrip("/")).name
    for suffixes in (_COMPRESSED, _DATA_SUFFIXES):
        stem = next((stem[: -len(x)] for x in suffixes if stem.lower().endswith(x)), stem)
    return _safe(stem)[:60] or "dataset"


def mixture_digest(mixture: list[str], splits: list[str], max_train_samples: int | None, seed: int) -> str:
    """sha256 of a mixture's specification: sources, amounts, splits, cap and seed."""
    spec = [mixture, splits, max_train_samples, seed]
    if max_train_samples is not None:
        spec.append("proportional-cap")  # the cap's meaning changed from "the first N": another digest
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def mixture_name(mixture: list[str], splits: list[str]) -> str:
    """Readable default name of a mixture: its sources' short names joined by ``+``, each with its split when
    that is not ``train`` (``tulu3_pref+ultrafeedback.test_prefs``); a long mixture keeps its first sources and
    counts the others (``a+b+c+7_more``). A store keeps names unique per :func:`mixture_digest`."""
    sources = mixture[0::2]
    if not sources:
        return "dataset"
    per_source = splits * len(sources) if len(splits) == 1 else splits
    parts = [source_stem(src) + ("" if split == "train" else f".{_safe(split)[:30]}")
             for src, split in zip(sources, per_source)]
    name = "+".join(parts)
    if len(name) <= _NAME_MAX:
        return name
    keep = [parts[0][: _NAME_MAX - 12]]
    for part in parts[1:]:
        if len("+".join(keep + [part])) > _NAME_MAX - 12:
            break
        keep.append(part)
    return "+".join(keep) + f"+{len(parts) - len(keep)}_more"

"""Mixture semantics (open-instruct's): amounts, per-source selection and the default list name."""

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


def mixture_name(mixture: list[str], splits: list[str], max_train_samples: int | None, seed: int) -> str:
    """Deterministic, filesystem-safe name of a mixture: first source's stem, source count, spec digest."""
    sources = mixture[0::2]
    first = Path(sources[0]).name if sources else "dataset"
    stem = first.rsplit(".", 1)[0] if first.lower().endswith((".jsonl", ".json", ".parquet")) else first
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", stem).strip("_.")[:60] or "dataset"
    if len(sources) > 1:
        stem += f"+{len(sources) - 1}"
    spec = json.dumps([mixture, splits, max_train_samples, seed])
    return f"{stem}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"

"""Metrics: averaging since the last log (on the device), the console line, and ``metrics.jsonl``.

Contract: :class:`DeviceMetrics` sums detached 0-d metric tensors on the device as micro-batches run and
turns them into floats only in :meth:`DeviceMetrics.pop` — one host sync per logging step, averaged across
ranks when a ``reduce`` is given. :func:`compact_line` is the console line (step, loss, accuracy, margin,
learning rate, tokens/s, ETA); ``metrics.jsonl`` holds every metric of every logging step.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch

from dpocache.files import atomic_write_text

# Display order of the seed's metric names; anything else follows alphabetically.
METRIC_ORDER = ("training_step", "learning_rate", "epoch", "train_loss", "logps/chosen", "logps/rejected",
                "rewards/chosen", "rewards/rejected", "rewards/average", "rewards/accuracy",
                "rewards/margin", "aux_loss", "grad_norm", "perf/tokens_per_second", "perf/elapsed_seconds")


class MetricAverager:
    """Mean of each metric over the micro-batches added since the last :meth:`pop`."""

    def __init__(self):
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] += float(value)
            self._counts[key] += 1

    def keys(self) -> list[str]:
        return sorted(self._sums)

    def pop(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums.clear()
        self._counts.clear()
        return out


class DeviceMetrics:
    """Running sums of metric tensors on the device (see the module docstring)."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            # float64 sums: averages over many micro-batches keep the precision of the values themselves
            value = (value.detach().double() if isinstance(value, torch.Tensor)
                     else torch.tensor(float(value), dtype=torch.float64))
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
            self._counts[key] += 1

    def pop(self, reduce=None) -> dict[str, float]:
        """Means since the last pop as floats (``reduce``: a cross-rank mean of a 1-D tensor)."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        device = self._sums[keys[0]].device
        values = torch.stack([self._sums[k].to(device) / self._counts[k] for k in keys])
        if reduce is not None:
            values = reduce(values)
        self._sums.clear()
        self._counts.clear()
        return dict(zip(keys, values.tolist()))


def ordered(metrics: dict) -> dict:
    keys = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    return {k: metrics[k] for k in keys}


def format_line(metrics: dict) -> str:
    parts = []
    for key, value in ordered(metrics).items():
        if isinstance(value, float):
            text = f"{value:.3e}" if key == "learning_rate" else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def compact_line(metrics: dict, total_steps: int, eta_seconds: float | None) -> str:
    """``step 12/80 | loss 0.6421 | acc 0.625 | margin 0.113 | lr 4.0e-07 | 2,315 tok/s | eta 3:12``."""
    from dpocache.console import format_seconds

    parts = [f"step {metrics.get('training_step')}/{total_steps}"]
    for key, label, fmt in (("train_loss", "loss", ".4f"), ("rewards/accuracy", "acc", ".3f"),
                            ("rewards/margin", "margin", ".3g"), ("learning_rate", "lr", ".1e"),
                            ("perf/tokens_per_second", "", ",.0f")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {value:{fmt}}".strip() + (" tok/s" if key.startswith("perf/") else ""))
    if metrics.get("nonfinite_steps_skipped"):
        parts.append(f"skipped {int(metrics['nonfinite_steps_skipped'])} non-finite step(s)")
    if eta_seconds is not None:
        parts.append(f"eta {format_seconds(eta_seconds)}")
    return " | ".join(parts)


class JsonlWriter:
    """Append-only ``metrics.jsonl``: one flushed JSON object per line (non-finite values as null)."""

    def __init__(self, path: str | Path, *, keep_until_step: int = 0):
        """A fresh file, or (resuming at ``keep_until_step`` > 0) the lines logged up to that step."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("training_step", 0) <= keep_until_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in ordered(metrics).items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

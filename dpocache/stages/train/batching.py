"""Deterministic epoch order and micro-batches, with optional length grouping.

Length grouping cuts padding: the epoch's seeded permutation is split into mega-batches of
``group_size`` optimizer batches; each mega-batch is sorted by length and cut into optimizer batches,
and the optimizer batches are shuffled. Because grouping works on whole optimizer batches
(``per_device_batch * world * accumulation``), every split of the same optimizer batch into
micro-batches, devices and accumulation steps sees the same examples at the same step.
"""

from __future__ import annotations

import numpy as np


def epoch_order(lengths: np.ndarray, step_batch: int, seed: int, epoch: int, *,
                group_by_length: bool = True, group_size: int = 16) -> np.ndarray:
    """Example indices of one epoch (every example exactly once)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if not group_by_length or len(order) <= step_batch:
        return order
    chunk = step_batch * group_size
    batches = []
    for start in range(0, len(order), chunk):
        block = order[start:start + chunk]
        block = block[np.argsort(-lengths[block], kind="stable")]
        batches += [block[i:i + step_batch] for i in range(0, len(block), step_batch)]
    # Keep a short final batch last: it must not be split across accumulation boundaries elsewhere.
    tail = [batches.pop()] if len(batches[-1]) < step_batch else []
    perm = rng.permutation(len(batches))
    return np.concatenate([batches[i] for i in perm] + tail)


def micro_batches(order: np.ndarray, per_device: int, rank: int = 0, world: int = 1):
    """Cut an epoch order into global micro-batches of ``per_device * world``; yield this rank's slice.

    With several ranks the last global batch is completed by wrapping around, so every rank sees the
    same number of micro-batches (as torch's DistributedSampler does).
    """
    global_bs = per_device * world
    if world > 1 and len(order) % global_bs:
        order = np.concatenate([order, order[: global_bs - len(order) % global_bs]])
    for start in range(0, len(order), global_bs):
        part = order[start:start + global_bs]
        yield part[rank * per_device:(rank + 1) * per_device] if world > 1 else part


def padded_fraction(lengths: np.ndarray, batches) -> float:
    """Fraction of pad tokens when each batch is padded to its longest sequence."""
    real = padded = 0
    for idx in batches:
        ls = lengths[np.asarray(idx)]
        real += int(ls.sum())
        padded += int(ls.max()) * len(ls)
    return 1.0 - real / max(padded, 1)

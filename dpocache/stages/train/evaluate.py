"""Held-out evaluation of the trained policy, streamed like training and run on the policy's device.

Contract: :func:`evaluate` reads the pairs of an :class:`~dpocache.stages.train.source.ExampleSource` in
length-sorted micro-batches (read ahead in a thread, pinned copies), runs the policy without gradients and
returns, against the stored reference, ``reward_accuracy`` and ``reward_margin`` (beta-scaled log-ratio
differences, summed or per-token averaged as the loss uses them); for a reference-free loss (no reference
to compare with) ``policy_preference_accuracy`` (chosen has the higher average log-prob per token) and
``policy_logp_margin``. Progress is reported (a bar on a terminal, periodic lines otherwise); the only host
syncs are one per progress report and the final one.
"""

from __future__ import annotations

import numpy as np
import torch

from dpocache.console import progress
from dpocache.stages.train.forward import loss_inputs, policy_logps
from dpocache.stages.train.loader import Collator, Prefetcher
from dpocache.stages.train.source import ExampleSource


def _share(lengths: np.ndarray, batch_size: int, rank: int, world: int):
    """This rank's length-sorted micro-batches as ``(counted, indices)``; every rank gets the same number (the
    short ones repeat a batch that is not counted), because sharded engines need every rank in each forward."""
    order = np.argsort(-lengths, kind="stable")
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    return [(1, b) for b in mine] + [(0, batches[0])] * (rounds - len(mine))


@torch.no_grad()
def evaluate(logp_model, source: ExampleSource, collate: Collator, objective, *, batch_size: int, device,
             rank: int = 0, world: int = 1, reduce_sum=None, desc: str = "held-out evaluation") -> dict[str, float]:
    """See the module docstring. Under several processes each rank measures its share of the batches and
    ``reduce_sum`` (a cross-rank sum of a tensor) combines them."""
    was_training = logp_model.training
    logp_model.eval()
    free = objective.reference_free or source.reference is None
    correct = torch.zeros((), dtype=torch.float64, device=device)
    margin_sum = torch.zeros((), dtype=torch.float64, device=device)
    batches = Prefetcher(source, _share(source.lengths, batch_size, rank, world), collate)
    bar = progress(len(source), desc, "pair")
    try:
        for host in batches:
            batch = host.to(device)
            inputs = loss_inputs(policy_logps(logp_model, batch), batch, objective.requirements)
            if free:
                inputs.reference = None
            margin = objective.margins(inputs)
            counted = batch.tag  # 0 for the repeated batches that keep the ranks in step
            correct += (margin > 0).sum() * counted
            margin_sum += margin.double().sum() * counted
            bar.update(batch.pairs * counted * world)
    finally:
        batches.close()
        bar.close()
        logp_model.train(was_training)
    totals = torch.stack([correct, margin_sum])
    if reduce_sum is not None:
        totals = reduce_sum(totals)
    accuracy, mean_margin = (totals / max(len(source), 1)).tolist()
    if free:
        return {"policy_preference_accuracy": accuracy, "policy_logp_margin": mean_margin}
    return {"reward_accuracy": accuracy, "reward_margin": mean_margin}

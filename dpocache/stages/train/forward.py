"""The concatenated forward of stage two: chosen and rejected of a micro-batch through the policy at once.

Contract: :func:`policy_logps` takes a device-resident :class:`~dpocache.stages.train.loader.HostBatch` and the
(wrapped) :class:`~dpocache.logprobs.TokenLogps` module and returns a :class:`PolicyOutput`: per-example
log-prob sums and trainable-token counts of the policy (``SequenceLogps``, differentiable), the per-token
values in padded layout ``[2B, T]`` with their mask (chosen rows first), the MoE router loss and WPO's
per-token statistic when the module computes them. :func:`loss_inputs` assembles what the configured loss
reads. Nothing here synchronises the host with the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpocache.losses import LossInputs, PairTokens, SequenceLogps
from dpocache.stages.train.loader import HostBatch
from dpocache.stages.train.packing import unpack


@dataclass
class PolicyOutput:
    logps: SequenceLogps
    per_token: torch.Tensor  # [2B, T] fp32, 0 where not trained (chosen rows first)
    token_mask: torch.Tensor  # [2B, T], the trainable mask aligned with per_token
    aux: torch.Tensor | None = None
    log_sum_sq: torch.Tensor | None = None  # [2B, T] WPO statistic, no gradient


def policy_logps(logp_model, batch: HostBatch) -> PolicyOutput:
    if batch.packed is not None:
        packed = batch.packed
        out = logp_model(packed.input_ids, None, packed.mask, packed.position_ids, batch.positions)
    else:
        out = logp_model(batch.input_ids, batch.attention_mask, batch.mask, None, batch.positions)
    per_token, aux, stat = out if isinstance(out, tuple) else (out, None, None)
    if batch.packed is not None:
        token_mask = unpack(batch.packed.mask, batch.packed)
        per_token = unpack(per_token, batch.packed)
        stat = None if stat is None else unpack(stat, batch.packed)
    else:
        token_mask = batch.mask
    sums, counts = per_token.sum(-1), token_mask.sum(-1)
    b = batch.pairs
    return PolicyOutput(SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:]), per_token, token_mask, aux, stat)


def reference_logps(batch: HostBatch) -> SequenceLogps | None:
    ref = batch.reference
    if ref is None:
        return None
    return SequenceLogps(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3])


def _pair_tokens(values: torch.Tensor | None, mask: torch.Tensor, pairs: int) -> PairTokens | None:
    if values is None:
        return None
    width = min(values.shape[1], mask.shape[1])
    values, mask = values[:, :width], mask[:, :width]
    return PairTokens(values[:pairs], values[pairs:], mask[:pairs], mask[pairs:])


def loss_inputs(policy: PolicyOutput, batch: HostBatch, requirements) -> LossInputs:
    """What the configured loss reads from this micro-batch (per-token views only when it needs them)."""
    b = batch.pairs
    return LossInputs(
        policy.logps, reference_logps(batch),
        policy_tokens=_pair_tokens(policy.per_token, policy.token_mask, b) if requirements.policy_tokens else None,
        reference_tokens=(_pair_tokens(batch.reference_tokens, policy.token_mask, b)
                          if requirements.reference_tokens else None),
        policy_log_sum_sq=_pair_tokens(policy.log_sum_sq, policy.token_mask, b) if requirements.policy_log_sum_sq
        else None,
        aux_loss=policy.aux)

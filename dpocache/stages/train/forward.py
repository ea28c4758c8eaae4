"""The concatenated forward of stage two: chosen and rejected of a micro-batch through the policy at once.

Contract: :func:`policy_logps` takes a device-resident :class:`~dpocache.stages.train.loader.HostBatch` and the
(wrapped) :class:`~dpocache.logprobs.TokenLogps` module and returns a :class:`PolicyOutput`: per-example
log-prob sums and trainable-token counts of the policy (``SequenceLogps``, differentiable), the per-token
values in padded layout ``[2B, T]`` (for losses that need them) and the MoE router loss (or None). Nothing
here synchronises the host with the device. :func:`reference_logps` views the stored reference values of the
batch as ``SequenceLogps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpocache.losses import SequenceLogps
from dpocache.stages.train.loader import HostBatch
from dpocache.stages.train.packing import unpack


@dataclass
class PolicyOutput:
    logps: SequenceLogps
    per_token: torch.Tensor  # [2B, T] fp32, 0 where not trained (chosen rows first)
    token_mask: torch.Tensor  # [2B, T], the trainable mask aligned with per_token
    aux: torch.Tensor | None


def policy_logps(logp_model, batch: HostBatch) -> PolicyOutput:
    if batch.packed is not None:
        packed = batch.packed
        out = logp_model(packed.input_ids, None, packed.mask, packed.position_ids, batch.positions)
        per_token, aux = out if isinstance(out, tuple) else (out, None)
        per_token, token_mask = unpack(per_token, packed), unpack(packed.mask, packed)
    else:
        out = logp_model(batch.input_ids, batch.attention_mask, batch.mask, None, batch.positions)
        per_token, aux = out if isinstance(out, tuple) else (out, None)
        token_mask = batch.mask
    sums, counts = per_token.sum(-1), token_mask.sum(-1)
    b = batch.pairs
    return PolicyOutput(SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:]), per_token, token_mask, aux)


def reference_logps(batch: HostBatch) -> SequenceLogps | None:
    ref = batch.reference
    if ref is None:
        return None
    return SequenceLogps(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3])

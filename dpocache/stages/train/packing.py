"""Padding-free ("packed") batches: several sequences in one row, attention kept inside each sequence.

A micro-batch's sequences are concatenated into ONE row ``[1, sum(len)]`` with no padding and with
``position_ids`` restarting at 0 at each sequence start. When a decoder gets no attention mask (and no KV
cache), transformers derives the sequence boundaries from those position ids: sdpa and eager attention get
a block-diagonal causal mask, flash attention gets ``cu_seqlens``. The trainable mask is cleared at every
sequence start, so the last position of a sequence never contributes a log-prob of the first token of the
next one; per-sequence sums and counts are then taken over each sequence's own tokens.

Not every model honours those boundaries (Falcon builds its mask without the position ids; convolution or
recurrent layers mix neighbouring tokens): :func:`require_packing` compares packed and padded log-probs on
a short input once at start-up and refuses such models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dpocache.config import ConfigError
from dpocache.logprobs import pad_batch, probe_tolerance

PROBE_LENGTHS = (7, 3, 10)


@dataclass
class PackedBatch:
    """Sequences concatenated into one row, with what is needed to keep them apart."""

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, 0 at every sequence start
    mask: torch.Tensor  # [1, T] long, trainable tokens; 0 at every sequence start
    segment_ids: torch.Tensor  # [T] long, index of the sequence each token belongs to
    lengths: list[int]

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device) -> "PackedBatch":
        from dpocache.devices import to_device

        return PackedBatch(*(to_device(t, device) for t in (self.input_ids, self.position_ids, self.mask,
                                                             self.segment_ids)), self.lengths)


def pack_flat(ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, *, pin: bool = False) -> PackedBatch:
    """One padding-free row from flat token arrays: sequence ``k`` is the next ``lengths[k]`` tokens.

    ``pin``: allocate the host tensors in pinned memory (for an asynchronous copy to a CUDA device).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if len(lengths) == 0 or (lengths <= 0).any() or len(ids) != total or len(mask) != total:
        raise ValueError(f"pack: {len(lengths)} sequences of lengths {lengths.tolist()[:8]} need >= 1 token each and "
                         f"ids/masks of {total} tokens (got {len(ids)} and {len(mask)})")
    starts = np.cumsum(lengths) - lengths
    segment = np.repeat(np.arange(len(lengths)), lengths)
    tensors = [torch.empty((1, total) if k < 3 else (total,), dtype=torch.long, pin_memory=pin) for k in range(4)]
    input_ids, position_ids, tmask, segment_ids = tensors
    input_ids.numpy()[0] = ids
    tmask.numpy()[0] = mask
    tmask.numpy()[0, starts] = 0
    segment_ids.numpy()[:] = segment
    position_ids.numpy()[0] = np.arange(total) - starts[segment]
    return PackedBatch(input_ids, position_ids, tmask, segment_ids, lengths.tolist())


def pack_batch(sequences: Sequence, masks: Sequence, *, device=None) -> PackedBatch:
    """Concatenate id and trainable-mask lists into one padding-free row (see the module docstring)."""
    if len(sequences) == 0 or len(sequences) != len(masks):
        raise ValueError(f"pack_batch needs as many masks as sequences (>= 1); got {len(sequences)} sequences "
                         f"and {len(masks)} masks")
    lengths = [len(s) for s in sequences]
    for i, (n, m) in enumerate(zip(lengths, masks)):
        if n == 0 or len(m) != n:
            raise ValueError(f"sequence {i}: {n} tokens and a mask of {len(m)}; both must be equal and >= 1")
    batch = pack_flat(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]),
                      np.concatenate([np.asarray(m, dtype=np.int64) for m in masks]), np.asarray(lengths))
    return batch.to(device) if device is not None else batch


def unpack(per_token: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``[1, T]`` per-token values back in padded layout ``[n, max(len)]`` (0 past each end; differentiable).

    Summing this row by row adds the same values in the same order as the padded forward does.
    """
    out = per_token.new_zeros(batch.num_sequences, max(batch.lengths))
    return out.index_put((batch.segment_ids, batch.position_ids.reshape(-1)), per_token.reshape(-1))


def sequence_sums(per_token: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of ``[1, T]`` per-token values (differentiable) and trainable-token counts."""
    return unpack(per_token, batch).sum(-1), unpack(batch.mask, batch).sum(-1)


def _logps_only(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def probe_sequences(vocab: int, lengths: Sequence[int] = PROBE_LENGTHS, seed: int = 0) -> tuple[list, list]:
    """Deterministic token ids (every token after the first trainable) for the packing probe."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return seqs, [[0] + [1] * (n - 1) for n in lengths]


def _packed_logps(call, seqs, masks, device) -> torch.Tensor:
    batch = pack_batch(seqs, masks, device=device)
    return _logps_only(call(batch.input_ids, None, batch.mask, batch.position_ids)).reshape(-1)


def packing_probe(logp_model: nn.Module, wrapped: nn.Module | None = None) -> tuple[float, float]:
    """``(gap, leak)`` of packed batches on a short probe input: the largest per-token |packed - padded| log-prob
    difference, and the largest change of the LAST packed sequence's log-probs when the tokens of the sequences
    packed before it change (0 when sequences stay apart; same-shape inputs run the same kernels, so any
    change at all is a leak, whatever the dtype).

    ``logp_model`` is a :class:`dpocache.logprobs.TokenLogps`; ``wrapped`` the prepared engine around it (its
    forward applies the training autocast and gathers sharded weights). It runs in eval mode without gradients
    and gets its training mode back afterwards.
    """
    model = logp_model.model
    call = wrapped if wrapped is not None else logp_model
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().num_embeddings
    seqs, masks = probe_sequences(vocab)
    other, _ = probe_sequences(vocab, PROBE_LENGTHS[:-1], seed=1)
    was_training = call.training
    call.eval()
    try:
        with torch.no_grad():
            padded = _logps_only(call(*pad_batch(seqs, masks, 0, device=device)))
            packed = _packed_logps(call, seqs, masks, device)
            changed = _packed_logps(call, other + seqs[-1:], masks, device)
    finally:
        call.train(was_training)
    rows = torch.cat([padded[i, :len(s)] for i, s in enumerate(seqs)])
    last = len(seqs[-1])
    gap = float((rows.float() - packed.float()).abs().max())
    return gap, float((packed[-last:].float() - changed[-last:].float()).abs().max())


def describe(model: nn.Module) -> str:
    """``model type 'llama' with attn_implementation 'sdpa'``, for messages."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or type(model).__name__
    impl = getattr(config, "_attn_implementation", None)
    return f"model type '{kind}' with attn_implementation '{impl}'"


ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "flex_attention", "sdpa", "eager")


def require_packing(logp_model: nn.Module, *, wrapped: nn.Module | None = None, device=None,
                    compute_dtype: torch.dtype | None = None) -> float:
    """Refuse (ConfigError) a model that lets packed sequences see each other, or whose packed log-probs differ
    from its padded ones beyond the rounding of the compute dtype; returns the gap.

    ``device``: move the model there first (what distributed preparation does anyway), so that an attention
    implementation that only runs on an accelerator is probed where it will train. ``compute_dtype``: the dtype
    the forward computes in (the autocast dtype under --bf16; default: the weights' dtype), which sets the
    tolerance (:func:`dpocache.logprobs.probe_tolerance`).
    """
    model = logp_model.model
    if device is not None:
        model.to(device)
    what = describe(model)
    dtype = compute_dtype or model.get_input_embeddings().weight.dtype
    atol = probe_tolerance(dtype)
    try:
        gap, leak = packing_probe(logp_model, wrapped)
    except (RuntimeError, TypeError, ValueError, ImportError) as exc:
        raise ConfigError(f"--packing: the packing probe could not run the {what}: "
                          f"{type(exc).__name__}: {exc}") from None
    if leak > 0 or not gap <= atol:
        current = getattr(getattr(model, "config", None), "_attn_implementation", None)
        others = ", ".join(i for i in ATTENTION_IMPLEMENTATIONS if i != current)
        found = (f"the log-probs of a packed sequence change when the sequences packed before it change (by up to "
                 f"{leak:.3g} nats)" if leak > 0 else
                 f"packed and padded log-probs differ by up to {gap:.3g} nats per token (tolerance {atol:g} for "
                 f"{str(dtype).replace('torch.', '')} compute)")
        raise ConfigError(f"--packing: the {what} does not keep packed sequences apart: {found}. Train without "
                          f"--packing, or try another --attn_implementation ({others}).")
    return gap

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
from dpocache.logprobs import pad_batch

PROBE_LENGTHS = (7, 3, 10)
FP32_TOLERANCE = 1e-4
HALF_TOLERANCE = 5e-2


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


def pack_batch(sequences: Sequence, masks: Sequence, *, device=None) -> PackedBatch:
    """Concatenate id and trainable-mask lists into one padding-free row (see the module docstring)."""
    if len(sequences) == 0 or len(sequences) != len(masks):
        raise ValueError(f"pack_batch needs as many masks as sequences (>= 1); got {len(sequences)} sequences "
                         f"and {len(masks)} masks")
    lengths = [len(s) for s in sequences]
    for i, (n, m) in enumerate(zip(lengths, masks)):
        if n == 0 or len(m) != n:
            raise ValueError(f"sequence {i}: {n} tokens and a mask of {len(m)}; both must be equal and >= 1")
    sizes = torch.as_tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    ids = torch.as_tensor(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    tmask = torch.as_tensor(np.concatenate([np.asarray(m, dtype=np.int64) for m in masks]))
    tmask[starts] = 0
    segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
    position_ids = torch.arange(ids.shape[0]) - starts[segment_ids]
    batch = PackedBatch(ids[None], position_ids[None], tmask[None], segment_ids, lengths)
    if device is not None:
        batch.input_ids, batch.position_ids, batch.mask, batch.segment_ids = (
            t.to(device) for t in (batch.input_ids, batch.position_ids, batch.mask, batch.segment_ids))
    return batch


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


def probe_sequences(vocab: int, lengths: Sequence[int] = PROBE_LENGTHS) -> tuple[list, list]:
    """Deterministic token ids (every token after the first trainable) for the packing probe."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    return seqs, [[0] + [1] * (n - 1) for n in lengths]


def packing_mismatch(logp_model: nn.Module) -> float:
    """Largest per-token |packed - padded| log-prob difference of ``logp_model`` on a short probe input.

    ``logp_model`` is a :class:`dpocache.logprobs.TokenLogps`; it runs in eval mode without gradients
    (dropout off) and gets its training mode back afterwards.
    """
    model = logp_model.model
    device = model.get_input_embeddings().weight.device
    seqs, masks = probe_sequences(model.get_input_embeddings().weight.shape[0])
    was_training = logp_model.training
    logp_model.eval()
    try:
        with torch.no_grad():
            padded = _logps_only(logp_model(*pad_batch(seqs, masks, 0, device=device)))
            batch = pack_batch(seqs, masks, device=device)
            packed = _logps_only(logp_model(batch.input_ids, None, batch.mask, batch.position_ids))
    finally:
        logp_model.train(was_training)
    rows = [padded[i, :n] for i, n in enumerate(batch.lengths)]
    return float((torch.cat(rows) - packed.reshape(-1)).abs().max())


def describe(model: nn.Module) -> str:
    """``model type 'llama' with attn_implementation 'sdpa'``, for messages."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) or type(model).__name__
    impl = getattr(config, "_attn_implementation", None)
    return f"model type '{kind}' with attn_implementation '{impl}'"


def require_packing(logp_model: nn.Module, *, device=None, atol: float | None = None) -> float:
    """Refuse (ConfigError) a model whose packed log-probs differ from its padded ones; returns the gap.

    ``device``: move the model there first (what distributed preparation does anyway), so that an
    attention implementation that only runs on an accelerator is probed where it will train.
    ``atol`` defaults to 1e-4 nats per token in fp32 and 5e-2 in 16-bit dtypes.
    """
    model = logp_model.model
    if device is not None:
        model.to(device)
    what = describe(model)
    if atol is None:
        half = model.get_input_embeddings().weight.dtype in (torch.float16, torch.bfloat16)
        atol = HALF_TOLERANCE if half else FP32_TOLERANCE
    try:
        gap = packing_mismatch(logp_model)
    except (RuntimeError, TypeError, ValueError, ImportError) as exc:
        raise ConfigError(f"--packing: the packing probe could not run the {what}: "
                          f"{type(exc).__name__}: {exc}") from None
    if not gap <= atol:
        raise ConfigError(
            f"--packing: the {what} does not keep packed sequences apart: packed and padded log-probs differ by "
            f"up to {gap:.3g} nats per token (tolerance {atol:g}). Train without --packing, or use a model whose "
            "attention honours packed position ids (e.g. Llama, Qwen2, Mistral, OLMo2 with sdpa, eager or "
            "flash_attention_2).")
    return gap

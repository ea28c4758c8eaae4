"""The HF scorer: reference log-probs with HF forward passes on the process's device.

Contract:
- The model runs on ``device`` (:func:`dpocache.devices.resolve_device` of ``--device``: ``cuda:LOCAL_RANK``
  under a launcher, ``cuda:0`` alone, the CPU without CUDA); one process per GPU scores in parallel.
- :meth:`HFScorer.score` queues every batch of a unit and returns at once: batches are built ahead by a
  thread (pinned host memory when the device is CUDA) and copied with ``non_blocking``; per-sequence sums
  and trainable-token counts are reduced on the device and copied back once per batch (the per-token
  values only with ``--save_token_logps``), asynchronously into pinned memory, with a CUDA event. The
  caller's thread never waits for the device; :meth:`PendingScores.collect` (the commit thread) does.
- :meth:`HFScorer.close` frees the model and the accelerator memory it held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpocache.devices import pin_host_memory, release_memory
from dpocache.logprobs import TokenLogps
from dpocache.modeling import ModelConfig, load_causal_lm, resize_for_tokenizer
from dpocache.stages.scoring.batches import (
    ChunkData,
    ChunkScores,
    HostBatch,
    batch_order,
    build_batch,
    prefetch,
    token_positions,
)


@dataclass
class _Queued:
    seqs: np.ndarray              # the batch's sequences (its host tensors are released once copied)
    packed: torch.Tensor          # [2, k] float64 on the host: sums, counts
    values: torch.Tensor | None   # [k, T] float32 on the host (per-token values), or None
    event: object | None          # a CUDA event recorded after the copies (None off CUDA)


class PendingScores:
    """The batches of one unit, queued on the device; :meth:`collect` waits for them."""

    def __init__(self, chunk: ChunkData, keep_tokens: bool):
        self.chunk = chunk
        self.keep_tokens = keep_tokens
        self.queued: list[_Queued] = []

    def collect(self) -> ChunkScores:
        n = len(self.chunk.lengths)
        sums, counts = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64)
        tokens = np.zeros(self.chunk.tokens, dtype=np.float32) if self.keep_tokens else None
        for item in self.queued:
            if item.event is not None:
                item.event.synchronize()
            packed = item.packed.numpy()
            sums[item.seqs] = packed[0]
            counts[item.seqs] = packed[1].astype(np.int64)
            if tokens is not None:
                rows, cols, src = token_positions(self.chunk, item.seqs)
                tokens[src] = item.values.numpy()[rows, cols]
        self.queued = []
        return ChunkScores(sums, counts, tokens)


class HFScorer:
    """Reference log-probs with HF forward passes, only at trainable positions (see the module docstring)."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, batch_size: int, device: torch.device):
        self.device = torch.device(device)
        model = load_causal_lm(model_cfg)
        resize_for_tokenizer(model, tokenizer)
        self.model = model.to(self.device)
        self.logps = TokenLogps(self.model)  # probes the fast path on the device; no router aux loss
        self.pad_id = tokenizer.pad_token_id
        self.batch_size = batch_size
        self.pin = pin_host_memory(self.device)

    def host_batches(self, chunk: ChunkData):
        """The unit's batches, built ahead in a background thread."""
        return prefetch(build_batch(chunk, seqs, self.pad_id, pin=self.pin)
                        for seqs in batch_order(chunk, self.batch_size))

    def to_device(self, batch: HostBatch) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=self.pin)
                     for t in (batch.ids, batch.attn, batch.tmask, batch.positions))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attn: torch.Tensor, tmask: torch.Tensor, positions: torch.Tensor):
        """On the device: per-token values ``[k, T]`` fp32 (0 off the mask) and ``[2, k]`` float64 (sums,
        trainable-token counts). ``positions``: the host-computed trained positions (no device sync)."""
        values = self.logps(ids, attn, tmask, None, positions).float().masked_fill(tmask == 0, 0.0)
        packed = torch.stack([values.double().sum(dim=1), tmask.sum(dim=1).double()])
        return values, packed

    @torch.no_grad()
    def score(self, chunk: ChunkData, keep_tokens: bool, on_batch=None) -> PendingScores:
        """Queue every batch of ``chunk`` on the device (see the module docstring)."""
        pending = PendingScores(chunk, keep_tokens)
        for batch in self.host_batches(chunk):
            values, packed = self.forward(*self.to_device(batch))
            host_packed = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=self.pin)
            host_packed.copy_(packed, non_blocking=self.pin)
            host_values = None
            if keep_tokens:
                host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=self.pin)
                host_values.copy_(values, non_blocking=self.pin)
            event = None
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            pending.queued.append(_Queued(batch.seqs, host_packed, host_values, event))
            if on_batch is not None:
                on_batch(len(batch.seqs), batch.tokens)
        return pending

    def close(self) -> None:
        del self.logps, self.model
        release_memory(self.device)

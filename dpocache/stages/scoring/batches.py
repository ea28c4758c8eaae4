"""Host side of stage one: a unit's sequences as flat arrays, padded batches, a prefetch thread.

Contract:
- :class:`ChunkData` holds a unit's examples as an Arrow table (hash, chosen/rejected ids and masks) and
  its ``2n`` sequences (the chosen sides in row order, then the rejected sides) as flat numpy arrays taken
  from Arrow in bulk: no Python list is ever built per token.
- :func:`batch_order` sorts the sequences by length (stable) and cuts them into ``batch_size`` batches:
  the batches depend only on the unit's rows and ``batch_size``.
- :func:`build_batch` pads one batch (right padding) directly into the tensors sent to the device; they are
  allocated in pinned memory when the device is CUDA (:func:`dpocache.devices.pin_host_memory`), so the copy
  to the device is asynchronous.
- :func:`prefetch` runs a generator in a background thread a few items ahead, so batches are built while
  the device computes.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dpocache.logprobs import trained_positions

SIDES = ("chosen", "rejected")
EXAMPLE_COLUMNS = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask"]


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated values and per-row lengths of a list column (array or chunked array)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return column.flatten().to_numpy(zero_copy_only=False), lengths


class ChunkData:
    """A unit's examples (see the module docstring); sequence ``k < n`` is row k's chosen side,
    ``n + k`` its rejected side."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.rows = table.num_rows
        ids, masks, lengths = [], [], []
        for side in SIDES:
            values, length = _flat(table.column(f"{side}_input_ids"))
            mask, mask_length = _flat(table.column(f"{side}_mask"))
            if not np.array_equal(length, mask_length):
                raise ValueError(f"{side} ids and mask lengths differ")
            ids.append(values)
            masks.append(mask)
            lengths.append(length)
        self.ids = np.concatenate(ids).astype(np.int64, copy=False)
        self.mask = np.concatenate(masks).astype(np.int8, copy=False)
        self.lengths = np.concatenate(lengths)
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.tokens = int(self.offsets[-1])

    @property
    def hashes(self) -> list[str]:
        return self.table.column("hash").to_pylist()

    def sequence(self, k: int) -> np.ndarray:
        return self.ids[self.offsets[k]:self.offsets[k + 1]]

    def sequence_mask(self, k: int) -> np.ndarray:
        return self.mask[self.offsets[k]:self.offsets[k + 1]]


@dataclass
class ChunkScores:
    """A unit's reference values, per sequence (chunk numbering: chosen sides, then rejected sides)."""

    sums: np.ndarray                  # float64 log-prob sums over trainable tokens
    counts: np.ndarray                # int64 trainable-token counts
    tokens: np.ndarray | None = None  # float32 per-token values aligned with ChunkData.ids, 0 off the mask


class ReadyScores:
    """Scores computed synchronously (the vLLM backend), behind :class:`~dpocache.stages.scoring.hf.PendingScores`'
    interface."""

    def __init__(self, scores: ChunkScores):
        self.scores = scores

    def collect(self) -> ChunkScores:
        return self.scores


def scores_from_token_values(chunk: ChunkData, values: np.ndarray, keep_tokens: bool) -> ChunkScores:
    """Sums and counts of per-token values given for every token of the chunk (flat, float64)."""
    trainable = chunk.mask.astype(bool)
    masked = np.where(trainable, values, 0.0)
    starts = chunk.offsets[:-1]
    sums = np.add.reduceat(masked, starts) if len(starts) else np.zeros(0)
    counts = np.add.reduceat(trainable.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    return ChunkScores(sums, counts, masked.astype(np.float32) if keep_tokens else None)


def batch_order(chunk: ChunkData, batch_size: int) -> list[np.ndarray]:
    """Sequence positions of each batch: sorted by length (stable), cut into ``batch_size``."""
    order = np.argsort(chunk.lengths, kind="stable")
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


@dataclass
class HostBatch:
    seqs: np.ndarray        # positions of the batch's sequences in the chunk
    ids: torch.Tensor       # [k, T] int64, padded with the pad id
    attn: torch.Tensor      # [k, T] int64, 1 on real tokens
    tmask: torch.Tensor     # [k, T] int64, 1 on trainable tokens
    tokens: int
    positions: torch.Tensor | None = None  # [2, N] (row, column) of the positions whose next token is trained


def token_positions(chunk: ChunkData, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every real token of the batch ``seqs``: its (row, column) in the padded batch and its position
    in the chunk's flat arrays."""
    lengths = chunk.lengths[seqs]
    rows = np.repeat(np.arange(len(seqs)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, cols, np.repeat(chunk.offsets[seqs], lengths) + cols


def build_batch(chunk: ChunkData, seqs: np.ndarray, pad_id: int, *, pin: bool) -> HostBatch:
    """One right-padded batch of the chunk's sequences ``seqs`` (pinned memory when ``pin``)."""
    k, width = len(seqs), int(chunk.lengths[seqs].max())
    rows, cols, src = token_positions(chunk, seqs)
    ids = torch.full((k, width), pad_id, dtype=torch.long, pin_memory=pin)
    attn = torch.zeros((k, width), dtype=torch.long, pin_memory=pin)
    tmask = torch.zeros((k, width), dtype=torch.long, pin_memory=pin)
    ids.numpy()[rows, cols] = chunk.ids[src]
    attn.numpy()[rows, cols] = 1
    tmask.numpy()[rows, cols] = chunk.mask[src]
    positions = trained_positions(tmask)  # computed here, so the forward never asks the device for them
    return HostBatch(seqs, ids, attn, tmask, len(src), positions.pin_memory() if pin else positions)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetch(items, depth: int = 2):
    """Yield ``items`` (any iterable) while a background thread produces the next ``depth`` ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="dpocache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()

"""Stage two's micro-batches: which examples (the plan), read ahead in a background thread, collated into
host tensors ready for an asynchronous copy to the device.

Contract:
- :func:`plan` yields ``(epoch, indices)`` for this rank, endlessly, in the seeded, length-grouped order of
  :mod:`dpocache.stages.train.batching`; the first ``skip`` micro-batches are passed over without reading
  anything (exact resume: the position is an index into the planned order).
- :class:`Collator` turns a :class:`~dpocache.stages.train.source.PairBatch` into a :class:`HostBatch`:
  chosen rows then rejected rows, right-padded to a multiple of ``pad_to_multiple_of`` (so kernels and their
  plans are reused across steps), or one padding-free packed row. Tensors are allocated in pinned memory
  when the device is CUDA. No device work and no host-device synchronisation happen here.
- :class:`Prefetcher` reads and collates ``depth`` micro-batches ahead in a thread, so reading never stalls
  the step; an error in the thread (a damaged store) is raised in the consumer, with its own message. It
  takes ``(tag, indices)`` pairs and hands each batch's tag on (:func:`plan`'s tag is the epoch).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from dpocache.devices import to_device
from dpocache.logprobs import trained_positions
from dpocache.stages.train.batching import epoch_order, micro_batches
from dpocache.stages.train.packing import PackedBatch, pack_flat
from dpocache.stages.train.source import ExampleSource, PairBatch


@dataclass
class HostBatch:
    """One micro-batch of ``pairs`` preference pairs: 2 * pairs sequences (chosen first), as tensors."""

    input_ids: torch.Tensor | None  # [2B, W] long (padded); None when packed
    attention_mask: torch.Tensor | None
    mask: torch.Tensor | None  # [2B, W] long, trainable tokens
    packed: PackedBatch | None
    positions: torch.Tensor  # [2, N] (row, column) of the positions whose next token is trained
    reference: torch.Tensor | None  # [B, 4] float32: ref chosen sum, rejected sum, chosen count, rejected count
    pairs: int
    num_tokens: int  # non-pad tokens, chosen + rejected (known on the host: no device sync to count them)
    hashes: np.ndarray
    tag: int = 0  # the plan's tag of this micro-batch: its epoch in training (see Prefetcher)
    reference_tokens: torch.Tensor | None = None  # [2B, W] float32 per-token reference log-probs (padded layout)

    def to(self, device) -> "HostBatch":
        """The same batch on ``device`` (asynchronous copies from pinned memory to CUDA)."""
        def move(t):
            return None if t is None else to_device(t, device)

        return HostBatch(move(self.input_ids), move(self.attention_mask), move(self.mask),
                         self.packed.to(device) if self.packed is not None else None, move(self.positions),
                         move(self.reference), self.pairs, self.num_tokens, self.hashes, self.tag,
                         move(self.reference_tokens))


def plan(lengths: np.ndarray, *, per_device: int, accumulation: int, rank: int, world: int, seed: int,
         group_by_length: bool, skip: int = 0):
    """Endless ``(epoch, indices)`` micro-batches of this rank (see the module docstring)."""
    step_batch = per_device * world * accumulation
    epoch, produced = 0, 0
    while True:
        order = epoch_order(lengths, step_batch, seed, epoch, group_by_length=group_by_length)
        per_epoch = -(-len(order) // (per_device * world))
        if produced + per_epoch <= skip:  # a whole epoch before the resume point: nothing to compute
            produced += per_epoch
            epoch += 1
            continue
        for idx in micro_batches(order, per_device, rank, world):
            produced += 1
            if produced > skip:
                yield epoch, idx
        epoch += 1


def _fill_padded(out: torch.Tensor, flat: np.ndarray, offsets: np.ndarray, row0: int) -> None:
    """Write the sequences of ``flat``/``offsets`` into rows ``row0..`` of ``out`` (left-aligned)."""
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(len(lengths)) + row0, lengths)
    cols = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)
    out.numpy()[rows, cols] = flat


class Collator:
    """PairBatch -> HostBatch (padded or packed); see the module docstring."""

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int = 1, packing: bool = False, pin: bool = False):
        self.pad_id, self.multiple, self.packing, self.pin = pad_id, max(1, pad_to_multiple_of), packing, pin

    def __call__(self, pairs: PairBatch, tag: int = 0) -> HostBatch:
        reference = None
        if pairs.reference is not None:
            reference = torch.empty((len(pairs), 4), dtype=torch.float32, pin_memory=self.pin)
            reference.numpy()[:] = pairs.reference
        if self.packing:
            lengths = np.concatenate([pairs.chosen.lengths, pairs.rejected.lengths])
            packed = pack_flat(np.concatenate([pairs.chosen.ids, pairs.rejected.ids]),
                               np.concatenate([pairs.chosen.mask, pairs.rejected.mask]), lengths, pin=self.pin)
            return HostBatch(None, None, None, packed, self._positions(packed.mask), reference, len(pairs),
                             pairs.num_tokens, pairs.hashes, tag, self._reference_tokens(pairs, int(lengths.max())))
        longest = int(max(pairs.chosen.lengths.max(), pairs.rejected.lengths.max()))
        width = -(-longest // self.multiple) * self.multiple
        shape = (2 * len(pairs), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long, pin_memory=self.pin)
        attn = torch.zeros(shape, dtype=torch.long, pin_memory=self.pin)
        tmask = torch.zeros(shape, dtype=torch.long, pin_memory=self.pin)
        for side, row0 in ((pairs.chosen, 0), (pairs.rejected, len(pairs))):
            _fill_padded(ids, side.ids, side.offsets, row0)
            _fill_padded(tmask, side.mask, side.offsets, row0)
            _fill_padded(attn, np.ones(int(side.offsets[-1]), dtype=np.int64), side.offsets, row0)
        return HostBatch(ids, attn, tmask, None, self._positions(tmask), reference, len(pairs), pairs.num_tokens,
                         pairs.hashes, tag, self._reference_tokens(pairs, width))

    def _reference_tokens(self, pairs: PairBatch, width: int) -> torch.Tensor | None:
        """Per-token reference log-probs in the padded layout ``[2B, width]`` (when the source read them)."""
        if pairs.chosen.reference is None:
            return None
        out = torch.zeros((2 * len(pairs), width), dtype=torch.float32, pin_memory=self.pin)
        for side, row0 in ((pairs.chosen, 0), (pairs.rejected, len(pairs))):
            _fill_padded(out, side.reference, side.offsets, row0)
        return out

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        positions = trained_positions(mask)
        return positions.pin_memory() if self.pin else positions


_DONE = object()


class Prefetcher:
    """Iterator of HostBatch read ``depth`` micro-batches ahead in a daemon thread (see the module docstring)."""

    def __init__(self, source: ExampleSource, batches, collate: Collator, *, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(source, batches, collate), daemon=True,
                                        name="dpocache-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, source: ExampleSource, batches, collate: Collator) -> None:
        try:
            for tag, idx in batches:
                if not self._put(collate(source.read(idx), tag)):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(exc)

    def __iter__(self):
        return self

    def __next__(self) -> HostBatch:
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join(timeout=1.0)

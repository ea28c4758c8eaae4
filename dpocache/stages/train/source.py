"""Stage two's examples, streamed: a small per-example index in memory, token ids read batch by batch.

Contract of an :class:`ExampleSource`:
- ``len(source)`` examples in training-list order (repeats of upsampled sources included);
- ``hashes`` (``np.ndarray`` of ``S64``), ``lengths`` (padded width of each pair: max of its chosen and
  rejected lengths) and ``reference`` (``[N, 4]`` float64: reference chosen sum, rejected sum, chosen count,
  rejected count; ``None`` for a reference-free loss trained from the data) — a few dozen bytes per example;
- ``read(indices)`` returns a :class:`PairBatch` with the token ids and trainable masks of those examples,
  read on demand: from the store's Parquet row groups (:class:`StoreSource`) or from the tokenized dataset's
  memory-mapped Arrow table (:class:`DatasetSource`). Host memory is the index plus the batches in flight,
  never the whole token data; a shard that disappeared or changed after the index was built is a
  :class:`~dpocache.artifacts.StoreError` naming it.

The index of a store list (:mod:`dpocache.stages.train.store_index`) is built once and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpocache.artifacts import StoreError

TOKEN_COLUMNS = ["chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask"]
REFERENCE_TOKEN_COLUMNS = ["ref_chosen_token_logps", "ref_rejected_token_logps"]
_OPEN_SHARDS = 64


def _flat(array: pa.Array, length: int) -> np.ndarray:
    """The values of a (possibly sliced) list array, ``length`` of them from its first offset."""
    first = int(array.offsets[0].as_py())
    return array.values.slice(first, length).to_numpy(zero_copy_only=False)


@dataclass
class Side:
    """Token sequences of one side as flat arrays: sequence ``k`` is ``ids[offsets[k]:offsets[k + 1]]``."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # int8, 1 where the token's log-prob is trained
    offsets: np.ndarray  # int64, len n + 1, offsets[0] == 0
    reference: np.ndarray | None = None  # float32 per-token reference log-probs (0 where not trained), if read

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_arrow(cls, ids: pa.Array, mask: pa.Array, reference: pa.Array | None = None) -> "Side":
        offsets = ids.offsets.to_numpy().astype(np.int64)
        start, stop = int(offsets[0]), int(offsets[-1])
        flat_ids = ids.values.slice(start, stop - start).to_numpy(zero_copy_only=False)
        flat_mask = _flat(mask, stop - start).astype(np.int8, copy=False)
        flat_ref = None if reference is None else _flat(reference, stop - start).astype(np.float32, copy=False)
        return cls(flat_ids.astype(np.int32, copy=False), flat_mask, offsets - start, flat_ref)

    def tokens(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.ids[a:b], self.mask[a:b]


@dataclass
class PairBatch:
    """The pairs of one micro-batch, read from the source, in the requested order."""

    indices: np.ndarray  # positions in the source's example list
    chosen: Side
    rejected: Side
    reference: np.ndarray | None  # [B, 4] float64, or None (reference-free)
    hashes: np.ndarray  # S64

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens of the batch (chosen and rejected)."""
        return int(self.chosen.offsets[-1] + self.rejected.offsets[-1])


def pair_batch_from_table(table: pa.Table, indices: np.ndarray, reference: np.ndarray | None,
                          hashes: np.ndarray) -> PairBatch:
    def side(name: str) -> Side:
        per_token = f"ref_{name}_token_logps"
        values = table.column(per_token).combine_chunks() if per_token in table.column_names else None
        return Side.from_arrow(table.column(f"{name}_input_ids").combine_chunks(),
                               table.column(f"{name}_mask").combine_chunks(), values)

    chosen, rejected = side("chosen"), side("rejected")
    return PairBatch(np.asarray(indices), chosen, rejected, reference, hashes)


class ExampleSource:
    """Common interface (see the module docstring)."""

    hashes: np.ndarray
    lengths: np.ndarray
    reference: np.ndarray | None
    description: str = ""

    def __len__(self) -> int:
        return len(self.hashes)

    def read(self, indices) -> PairBatch:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class StoreSource(ExampleSource):
    """A store's example list: the index in memory, tokens read from the Parquet row groups holding a batch."""

    def __init__(self, root: Path, index, *, description: str = "", reference_tokens: bool = False):
        """``reference_tokens``: also read the per-token reference log-probs (the index must have them)."""
        self.root = Path(root)
        self.index = index  # dpocache.stages.train.store_index.ListIndex
        self.columns = TOKEN_COLUMNS + (REFERENCE_TOKEN_COLUMNS if reference_tokens else [])
        self.hashes, self.lengths, self.reference = index.hashes, index.lengths, index.reference
        self.description = description
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self.bytes_requested = 0

    def _open(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard in self._files:
            return self._files[shard]
        entry = self.index.shards[shard]
        path = self.root / entry["path"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise StoreError(f"{path}: shard deleted while training (it held examples of this run); restore it or "
                             "re-score the store, then resume from the last checkpoint") from None
        if st.st_size != entry["bytes"] or st.st_mtime_ns != entry["mtime_ns"]:
            raise StoreError(f"{path}: shard changed on disk while training ({st.st_size} bytes, the store listed "
                             f"{entry['bytes']}): the store is damaged; verify it with `dpocache inspect "
                             f"{self.root} --verify`")
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"{path}: unreadable shard ({exc})") from None
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(self._files) >= _OPEN_SHARDS:
            self._files.pop(next(iter(self._files)))
        self._files[shard] = (pf, starts)
        return pf, starts

    def _read_shard(self, shard: int, rows: np.ndarray) -> pa.Table:
        pf, starts = self._open(shard)
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        path = self.root / self.index.shards[shard]["path"]
        try:
            table = pf.read_row_groups(groups.tolist(), columns=self.columns)
        except (pa.ArrowException, OSError) as exc:
            raise StoreError(f"{path}: unreadable Parquet data ({exc}); the shard is damaged") from None
        self.bytes_requested += sum(pf.metadata.row_group(int(g)).total_byte_size for g in groups)
        base = np.cumsum(np.concatenate([[0], starts[groups + 1] - starts[groups]]))[:-1]
        group_of = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[group_of] + base[np.searchsorted(groups, group_of)]
        return table.take(pa.array(local))

    def read(self, indices) -> PairBatch:
        indices = np.asarray(indices, dtype=np.int64)
        shard, row = self.index.shard[indices], self.index.row[indices]
        parts, order = [], []
        for s in np.unique(shard):
            pick = np.nonzero(shard == s)[0]
            parts.append(self._read_shard(int(s), row[pick].astype(np.int64)))
            order.append(pick)
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:  # back to the requested order
            table = table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
        return pair_batch_from_table(table, indices, self.reference[indices], self.hashes[indices])

    def close(self) -> None:
        self._files.clear()


class DatasetSource(ExampleSource):
    """A tokenized dataset (reference-free losses trained from the data): rows taken from its Arrow table."""

    def __init__(self, dataset, hashes: list[str], *, description: str = ""):
        self._table = dataset.with_format("arrow")
        names, widths = [], []
        for batch in self._table.iter(batch_size=8192):  # streamed: one batch of rows in memory at a time
            names.append(batch.column("hash").to_numpy(zero_copy_only=False).astype("S64"))
            widths.append(np.maximum(pc.list_value_length(batch.column("chosen_input_ids")).to_numpy(),
                                     pc.list_value_length(batch.column("rejected_input_ids")).to_numpy()))
        unique = np.concatenate(names)
        by_hash = np.argsort(unique)
        self.hashes = np.asarray(hashes, dtype="S64")
        found = np.searchsorted(unique, self.hashes, sorter=by_hash)
        self.rows = by_hash[np.minimum(found, len(unique) - 1)]
        if not (unique[self.rows] == self.hashes).all():
            raise ValueError("the example list names hashes that the tokenized dataset does not hold")
        self.lengths = np.concatenate(widths).astype(np.int64)[self.rows]
        self.reference = None
        self.description = description

    def read(self, indices) -> PairBatch:
        indices = np.asarray(indices, dtype=np.int64)
        table = self._table[self.rows[indices].tolist()]
        return pair_batch_from_table(table.select(TOKEN_COLUMNS), indices, None, self.hashes[indices])

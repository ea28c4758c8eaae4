"""From a mixture specification to tokenized, hashed, deduplicated examples (``load_preference_data``).

Per source: read and validate rows (bad rows stop or are skipped and counted), tokenize them with a
cached, batched ``datasets.map``, drop pairs left without trainable tokens, collapse duplicates to
their first occurrence, then select the source's amount. ``max_train_samples`` is shared among the
sources in proportion to their selections (``mixer.cap_counts``). Sources are concatenated in mixture
order. Per source, ``stats`` holds ``selected`` (the amount) and ``train_examples`` (after the cap).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from jinja2.exceptions import TemplateError

from dpocache.data.config import DataConfig
from dpocache.data.errors import DataError
from dpocache.data.formats import FORMATS, detect_format, normalize
from dpocache.data.mixer import mixture_digest as _mixture_digest
from dpocache.data.mixer import mixture_name as _mixture_name
from dpocache.data.mixer import CAP_STREAM, cap_counts, cap_selection, select_indices
from dpocache.data.sources import read_source
from dpocache.data.templates import template_label
from dpocache.data.tokenize import HASH_VERSION, example_hash, tokenize_side

EXAMPLE_COLUMNS = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask"]
TRUNCATION_DROP = "no_trainable_tokens_after_truncation"
TEMPLATE_DROP = "template_refused"  # the chat template raised on the row (the message follows after ": ")
_REFUSED = {"hash": "", "chosen_input_ids": [], "chosen_mask": [], "rejected_input_ids": [], "rejected_mask": [],
            "truncated": False, "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0}
STAGE_BATCH = 1000  # validated rows buffered before they are written to the staging Arrow file


@dataclass
class PreparedData:
    """Tokenized examples of a mixture.

    ``dataset`` holds each unique example once, in mixture order (columns ``EXAMPLE_COLUMNS``);
    ``hashes`` is the training list in mixture order, with the repeats of upsampled sources.
    """

    dataset: Any
    stats: dict = field(default_factory=dict)
    name: str = "dataset"
    hashes: list[str] = field(default_factory=list)


def mixture_name(cfg: DataConfig) -> str:
    """Default named-list name of the mixture of ``cfg`` (readable: its sources' names)."""
    return _mixture_name(cfg.mixture(), cfg.mixer_list_splits)


def mixture_digest(cfg: DataConfig) -> str:
    """sha256 of the mixture specification of ``cfg`` (what keeps default list names unique in a store)."""
    return _mixture_digest(cfg.mixture(), cfg.mixer_list_splits, cfg.max_train_samples, cfg.seed)


def validated_rows(source: str, split: str, cfg: DataConfig, stats: dict) -> Iterator[tuple[str, str, str]]:
    """Validated rows of one source as (row label, chosen JSON, rejected JSON), streamed.

    ``stats`` is filled once the rows are exhausted (rows read, dropped by reason, detected format).
    """
    dropped: Counter = Counter()
    first_seen: dict[str, str] = {}
    fmt = None if cfg.dataset_format == "auto" else cfg.dataset_format
    read = 0
    for label, raw in read_source(source, split, cfg.dataset_cache_dir):
        read += 1
        try:
            if isinstance(raw, DataError):  # a line the reader could not parse
                raise raw
            if fmt is None:
                fmt = _detect(raw, source, label)
            chosen, rejected = normalize(raw, fmt, source, label)
            encoded = _as_json(chosen, source, label), _as_json(rejected, source, label)
        except DataError as exc:
            if cfg.on_bad_row == "error":
                raise
            dropped[exc.reason] += 1
            first_seen.setdefault(exc.reason, str(exc))
            continue
        yield label, *encoded
    stats.update(source=source, split=split, format=fmt or "unknown", rows_read=read, dropped=dict(dropped),
                 first_dropped=first_seen)
    if read == 0:
        raise DataError(source, None, f"no rows in split {split!r}", reason="empty")


def _as_json(conversation: list[dict], source: str, label: str) -> str:
    """The conversation as JSON text; text that is not valid Unicode (a lone surrogate escape such as
    ``\\ud800`` in JSON) is a row defect, not a crash in the tokenizer."""
    text = json.dumps(conversation, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        escaped = text[exc.start:exc.end].encode("unicode_escape").decode()
        raise DataError(source, label, f"the text holds {escaped}, a lone surrogate that is not valid Unicode",
                        reason="invalid_text") from None
    return text


def _detect(raw: object, source: str, label: str) -> str:
    fmt = detect_format(raw)
    if fmt is None:
        what = f"columns {sorted(raw)}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise DataError(source, label, f"cannot detect the format from {what}: expected chosen/rejected "
                        "conversations, prompt/chosen/rejected, or HH-RLHF strings (see --dataset_format)",
                        reason="unknown_format")
    return fmt


def _cache_dir(cfg: DataConfig) -> Path:
    from dpocache.files import dpocache_home

    path = Path(cfg.dataset_cache_dir).expanduser() if cfg.dataset_cache_dir else dpocache_home() / "tokenized"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fingerprint(rows_digest: str, tokenizer, cfg: DataConfig) -> str:
    """Content fingerprint of a tokenization: rows, tokenizer, template and every setting that matters."""
    from dpocache.artifacts.identity import tokenizer_fingerprint

    spec = [HASH_VERSION, tokenizer_fingerprint(tokenizer), tokenizer.chat_template, cfg.mask_mode, cfg.add_bos,
            cfg.max_seq_length, rows_digest, 3]
    return hashlib.sha256(json.dumps(spec, default=str).encode()).hexdigest()[:32]


def _row_features():
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"row": text, "chosen": text, "rejected": text})


def stage_rows(rows: Iterable[tuple[str, str, str]], directory: Path) -> tuple[Path | None, str]:
    """Write validated rows to an Arrow file in ``directory`` in batches (memory stays flat in the row count).

    Returns (path, or None when there are no rows; content digest of the rows).
    """
    from datasets.arrow_writer import ArrowWriter

    digest = hashlib.sha256()
    fd, name = tempfile.mkstemp(prefix="rows-", suffix=".arrow", dir=directory)
    os.close(fd)
    path = Path(name)
    count = 0
    try:
        writer = ArrowWriter(features=_row_features(), path=str(path), writer_batch_size=STAGE_BATCH)
        try:
            batch: dict[str, list[str]] = {"row": [], "chosen": [], "rejected": []}
            for label, c_json, r_json in rows:
                digest.update(c_json.encode() + b"\0" + r_json.encode() + b"\0")
                batch["row"].append(label)
                batch["chosen"].append(c_json)
                batch["rejected"].append(r_json)
                count += 1
                if len(batch["row"]) == STAGE_BATCH:
                    writer.write_batch(batch)
                    batch = {key: [] for key in batch}
            if batch["row"]:
                writer.write_batch(batch)
            writer.finalize()
        finally:
            writer.close()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if count == 0:
        path.unlink(missing_ok=True)
        return None, digest.hexdigest()
    return path, digest.hexdigest()


def _features():
    import datasets

    ids, mask = datasets.List(datasets.Value("int32")), datasets.List(datasets.Value("int8"))
    return datasets.Features({
        "row": datasets.Value("string"), "hash": datasets.Value("string"), "chosen_input_ids": ids, "chosen_mask": mask,
        "rejected_input_ids": ids, "rejected_mask": mask, "truncated": datasets.Value("bool"),
        "drop": datasets.Value("string"), "prompt_tokens": datasets.Value("int32"),
        "chosen_tokens": datasets.Value("int32"), "rejected_tokens": datasets.Value("int32"),
    })


def _tokenize_batch(batch: dict, tokenizer, cfg: DataConfig, label: str, source: str) -> dict:
    keys = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask", "truncated", "drop",
            "prompt_tokens", "chosen_tokens", "rejected_tokens"]
    out: dict[str, list] = {k: [] for k in keys}
    for row, c_json, r_json in zip(batch["row"], batch["chosen"], batch["rejected"]):
        sides = []
        try:
            for conv in (c_json, r_json):
                sides.append(tokenize_side(tokenizer, json.loads(conv), cfg.mask_mode, cfg.add_bos,
                                           cfg.max_seq_length, label))
        except DataError as exc:  # a template defect: name the first row that shows it
            raise DataError(source, row, exc.defect, reason=exc.reason) from None
        except TemplateError as exc:  # the template refuses this conversation (e.g. no system role): a row defect
            for key, value in _REFUSED.items():
                out[key].append(value)
            out["drop"].append(f"{TEMPLATE_DROP}: {label} refused the conversation ({exc})")
            continue
        c, r = sides
        out["hash"].append(example_hash(c.ids, c.mask, r.ids, r.mask))
        out["chosen_input_ids"].append(c.ids)
        out["chosen_mask"].append(c.mask)
        out["rejected_input_ids"].append(r.ids)
        out["rejected_mask"].append(r.mask)
        out["truncated"].append(c.truncated or r.truncated)
        out["drop"].append("" if any(c.mask) and any(r.mask) else TRUNCATION_DROP)
        out["prompt_tokens"].append(c.prompt_tokens)
        out["chosen_tokens"].append(c.length)
        out["rejected_tokens"].append(r.length)
    return out


def tokenize_rows(rows: Iterable[tuple[str, str, str]], tokenizer, cfg: DataConfig, source: str, progress: bool):
    """Tokenize validated rows with ``datasets.map`` (batched), cached on disk under a content fingerprint.

    The rows are streamed to a temporary Arrow file first, so neither the rows nor their JSON stay in
    memory; the cached result keeps the row labels and the tokenized columns only. Returns None when
    there were no rows.
    """
    import datasets

    cache = _cache_dir(cfg)
    path, digest = stage_rows(rows, cache)
    if path is None:
        return None
    fp = _fingerprint(digest, tokenizer, cfg)
    label = template_label(tokenizer, cfg)
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        staged = datasets.Dataset.from_file(str(path))
        return staged.map(_tokenize_batch, fn_kwargs=dict(tokenizer=tokenizer, cfg=cfg, label=label, source=source),
                          batched=True, batch_size=256, features=_features(), remove_columns=["chosen", "rejected"],
                          new_fingerprint=fp, cache_file_name=str(cache / f"{fp}.arrow"), load_from_cache_file=True,
                          desc=f"tokenizing {Path(source).name}")
    finally:
        path.unlink(missing_ok=True)  # the mapped result is its own file; the staged rows are not needed
        if was_enabled and not progress:
            datasets.enable_progress_bars()


def _report_drops(st: dict) -> None:
    """Skipped and dropped rows are never silent: one line per source on stderr."""
    dropped = st.get("dropped", {})
    if dropped:
        detail = "; ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        print(f"{st['source']}: dropped {sum(dropped.values())} of {st['rows_read']} rows ({detail})",
              file=sys.stderr)
        for reason, message in sorted(st.get("first_dropped", {}).items()):
            print(f"  first {reason}: {message}", file=sys.stderr)


def _process_source(i: int, source: str, amount: str, split: str, cfg: DataConfig, tokenizer, seen: set[str],
                    progress: bool):
    """(tokenized unique examples of one source, selected positions into them, stats)."""
    st: dict = {"amount": amount}
    ds = tokenize_rows(validated_rows(source, split, cfg, st), tokenizer, cfg, source, progress)
    st["dropped"].setdefault(TRUNCATION_DROP, 0)
    keep: list[int] = []
    dup = truncated = 0
    if ds is not None:
        for k, (h, drop, tr) in enumerate(zip(ds["hash"][:], ds["drop"][:], ds["truncated"][:])):
            if drop:
                reason, _, message = drop.partition(": ")
                if message and cfg.on_bad_row == "error":
                    raise DataError(source, ds[k]["row"], message, reason=reason)
                st["dropped"][reason] = st["dropped"].get(reason, 0) + 1
                if message:
                    st["first_dropped"].setdefault(reason, f"{source}, {ds[k]['row']}: {message}")
                continue
            if h in seen:
                dup += 1
                continue
            seen.add(h)
            truncated += bool(tr)
            keep.append(k)
    if not st["dropped"][TRUNCATION_DROP]:
        del st["dropped"][TRUNCATION_DROP]
    pick = select_indices(len(keep), amount, np.random.default_rng([cfg.seed, i]))
    st.update(kept=len(keep), duplicates=dup, truncated=truncated, selected=int(len(pick)))
    return (ds.select(keep) if keep else None), pick, st


def prepare_examples(cfg: DataConfig, tokenizer, *, progress: bool = True, report_drops: bool = True):
    """(unique examples with every internal column, ordered training list of hashes, stats).

    Skipped and dropped rows are reported per source on stderr unless ``report_drops`` is False."""
    import datasets

    if not cfg.mixture():
        raise DataError("--dataset/--mixer_list", None, "no data given", reason="config")
    if cfg.dataset_format not in ("auto",) + FORMATS:
        raise DataError("--dataset_format", None, f"unknown format {cfg.dataset_format!r}", reason="config")
    seen: set[str] = set()
    processed = [_process_source(i, source, amount, split, cfg, tokenizer, seen, progress)
                 for i, (source, amount, split) in enumerate(cfg.sources())]
    counts = cap_counts([len(pick) for _, pick, _ in processed], cfg.max_train_samples)
    parts, order, per_source = [], [], []
    for i, ((ds, pick, st), count) in enumerate(zip(processed, counts)):
        pick = cap_selection(pick, count, np.random.default_rng([cfg.seed, i, CAP_STREAM]))
        st["train_examples"] = int(len(pick))
        if report_drops:
            _report_drops(st)
        per_source.append(st)
        if ds is not None:
            parts.append(ds)
            hashes = ds["hash"][:]
            order += [hashes[j] for j in pick]
    if not order:
        raise DataError(", ".join(s for s, _, _ in cfg.sources()), None, "no usable examples left after "
                        "validation, truncation and sampling", reason="empty")
    everything = datasets.concatenate_datasets(parts)
    position = {h: k for k, h in enumerate(everything["hash"][:])}
    unique = list(dict.fromkeys(order))
    dataset = everything.select([position[h] for h in unique])
    totals = {key: sum(s[key] for s in per_source) for key in ("rows_read", "kept", "duplicates", "truncated")}
    dropped: Counter = Counter()
    for s in per_source:
        dropped.update(s["dropped"])
    totals.update(dropped=sum(dropped.values()), dropped_by_reason=dict(dropped), examples=len(order),
                  unique_examples=len(unique))
    return dataset, order, {"sources": per_source, "totals": totals}


def load_preference_data(cfg: DataConfig, tokenizer, *, progress: bool = True) -> PreparedData:
    """Read, validate, tokenize, hash, deduplicate and mix the sources of ``cfg``.

    ``tokenizer`` must have been through :func:`prepare_tokenizer`. Raises :class:`DataError` on bad
    input (``on_bad_row="error"``) or when no usable example is left.
    """
    dataset, order, stats = prepare_examples(cfg, tokenizer, progress=progress)
    dataset = dataset.select_columns(EXAMPLE_COLUMNS)
    return PreparedData(dataset=dataset, stats=stats, name=mixture_name(cfg), hashes=order)

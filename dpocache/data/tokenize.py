"""Rendering with the chat template, assistant-token masks, truncation and the example hash.

Masks are found for any template by rendering prefixes: the text of the conversation up to an
assistant turn's header (``add_generation_prompt=True``) and up to the end of that turn. Tokens of
the full rendering whose character span starts inside that window are trainable. The full rendering
must extend each prefix (the "prefix property"); a template that breaks it is reported by name.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from dpocache.data.errors import DataError

HASH_VERSION = "dpocache-example-v1"


def example_hash(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> str:
    """sha256 of HASH_VERSION + each array as (uint64 little-endian length, little-endian values).

    Token ids are encoded as int32, masks as int8, in the order chosen ids, chosen mask, rejected ids,
    rejected mask. The digest depends only on what is scored: stable across processes and machines.
    """
    h = hashlib.sha256(HASH_VERSION.encode("ascii") + b"\0")
    for values, dtype in ((chosen_ids, "<i4"), (chosen_mask, "<i1"), (rejected_ids, "<i4"), (rejected_mask, "<i1")):
        arr = np.asarray(values, dtype=dtype)
        h.update(struct.pack("<Q", arr.size))
        h.update(arr.tobytes())
    return h.hexdigest()


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], mask_mode: str) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans of the trainable assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask_mode == "final_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        start_text = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        end_text = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text)) or len(end_text) <= len(start_text):
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise DataError(name, None, "the chat template does not render conversations as extensions of their "
                            "prefixes, so assistant tokens cannot be located; use --chat_template_name",
                            reason="template")
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_side(tokenizer, messages: list[dict], mask_mode: str, add_bos: bool,
                  max_len: int | None) -> tuple[list[int], list[int], bool]:
    """(ids, mask, truncated) of one conversation."""
    text, spans = assistant_spans(tokenizer, messages, mask_mode)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [0] * len(ids)
    for k, (start, end) in enumerate(offsets):
        if end > start and any(a <= start < b for a, b in spans):
            mask[k] = 1
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [0] + mask
    if mask:
        mask[0] = 0
    truncated = max_len is not None and len(ids) > max_len
    if truncated:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask, truncated

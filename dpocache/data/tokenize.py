"""Rendering with the chat template, assistant-token masks, truncation and the example hash.

Masks are found for any template by rendering prefixes of the conversation. For each trainable
assistant turn ``i``: ``H = render(messages[:i], add_generation_prompt=True)`` ends where the turn's
content starts (after its role header) and ``E = render(messages[:i + 1])`` ends where the turn ends
(its end-of-turn marker included). The full rendering must extend both (the "prefix property");
tokens of the full rendering that start in ``[len(H), len(E))`` are trainable. A template that
breaks the prefix property is reported by name. Templates that mark replies with
``{% generation %}`` use the tokenizer's own assistant mask instead.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

import numpy as np

from dpocache.data.errors import DataError

HASH_VERSION = "dpocache-example-v1"


def example_hash(chosen_ids, chosen_mask, rejected_ids, rejected_mask) -> str:
    """sha256 hex of ``HASH_VERSION + b"\\0"`` then each array as (uint64 LE length, LE values).

    Token ids are encoded as int32, masks as int8, in the order chosen ids, chosen mask, rejected ids,
    rejected mask. The digest depends only on what is scored: stable across processes, machines,
    Python hash seeds and row order.
    """
    h = hashlib.sha256(HASH_VERSION.encode("ascii") + b"\0")
    for values, dtype in ((chosen_ids, "<i4"), (chosen_mask, "<i1"), (rejected_ids, "<i4"), (rejected_mask, "<i1")):
        arr = np.asarray(values, dtype=dtype)
        h.update(struct.pack("<Q", arr.size))
        h.update(arr.tobytes())
    return h.hexdigest()


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _template_error(label: str, what: str) -> DataError:
    return DataError(label, None, f"{what}, so assistant tokens cannot be located; pick another template with "
                     "--chat_template_name (or use one whose replies are marked with {% generation %})",
                     reason="template")


def assistant_spans(tokenizer, messages: list[dict], mask_mode: str, label: str = "the chat template"
                    ) -> tuple[str, list[tuple[int, int]]]:
    """Full rendered text and the character spans ``[start, end)`` of the trainable assistant turns."""
    full = _render(tokenizer, messages, generation_prompt=False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask_mode == "final_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        head = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        end = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not full.startswith(head):
            raise _template_error(label, f"{label} does not render the conversation as an extension of its prefix "
                                  f"up to the header of assistant turn {i} (add_generation_prompt=True)")
        if full.startswith(end) and len(end) > len(head):
            spans.append((len(head), len(end)))
            continue
        stop = _earlier_turn_end(full, head, end, messages[i]["content"])
        if stop is None:
            raise _template_error(label, f"{label} renders assistant turn {i} differently when it is the last "
                                  "message than inside the conversation")
        spans.append((len(head), stop))
    return full, spans


def _earlier_turn_end(full: str, head: str, end: str, content: str) -> int | None:
    """Where an earlier assistant turn ends in ``full`` when the template renders a reply differently as
    the last message (Qwen3's adds an empty reasoning block to the final reply only): the turn's exact
    content, then the same closing text (end-of-turn marker) as in its rendering as the last message.
    None when the content is not found verbatim (the template rewrote it: e.g. stripped reasoning)."""
    own = end.rfind(content)
    if own < len(head) or not content:
        return None
    closing = end[own + len(content):]
    at = full.find(content, len(head))
    if at < 0 or not full.startswith(closing, at + len(content)):
        return None
    return at + len(content) + len(closing)


def _mask_from_offsets(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    for k, (start, stop) in enumerate(enc["offset_mapping"]):
        if stop > start and any(a <= start < b for a, b in spans):
            mask[k] = 1
    return ids, mask


def _mask_from_prefix_tokens(tokenizer, text: str, spans, label: str) -> tuple[list[int], list[int]]:
    """For tokenizers without offsets: tokenize each span boundary's prefix and check it is a token prefix."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    mask = [0] * len(ids)
    for start, stop in spans:
        bounds = []
        for cut in (start, stop):
            prefix = list(tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) if cut else []
            if ids[: len(prefix)] != prefix:
                raise _template_error(label, f"with {label}, tokens of a conversation prefix are not a prefix of "
                                      "the conversation's tokens (a token spans a turn boundary)")
            bounds.append(len(prefix))
        mask[bounds[0]: bounds[1]] = [1] * (bounds[1] - bounds[0])
    return ids, mask


def _uses_generation_blocks(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return isinstance(template, str) and "generation %}" in template


def _mask_from_generation_blocks(tokenizer, messages: list[dict], mask_mode: str) -> tuple[list[int], list[int]]:
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), [int(bool(m)) for m in enc["assistant_masks"]]
    if mask_mode == "final_turn" and any(mask):
        last = max(k for k, m in enumerate(mask) if m)
        first = last
        while first > 0 and mask[first - 1]:
            first -= 1
        mask = [1 if first <= k <= last else 0 for k in range(len(mask))]
    return ids, mask


class Side(NamedTuple):
    """One tokenized conversation: ids and mask (after truncation) and lengths before truncation."""

    ids: list[int]
    mask: list[int]
    length: int          # tokens before truncation
    prompt_tokens: int   # tokens before the final reply's first trainable token (its role header included)

    @property
    def truncated(self) -> bool:
        return self.length > len(self.ids)


def tokenize_side(tokenizer, messages: list[dict], mask_mode: str, add_bos: bool, max_len: int | None,
                  label: str = "the chat template") -> Side:
    """Render, tokenize and mask one conversation, then right-truncate it to ``max_len`` tokens."""
    if _uses_generation_blocks(tokenizer):
        ids, mask = _mask_from_generation_blocks(tokenizer, messages, mask_mode)
    else:
        text, spans = assistant_spans(tokenizer, messages, mask_mode, label)
        if getattr(tokenizer, "is_fast", True):
            ids, mask = _mask_from_offsets(tokenizer, text, spans)
        else:
            ids, mask = _mask_from_prefix_tokens(tokenizer, text, spans, label)
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos] + ids, [0] + mask
    if mask:
        mask[0] = 0
    length, prompt_tokens = len(ids), _final_reply_start(mask)
    if max_len is not None and length > max_len:
        ids, mask = ids[:max_len], mask[:max_len]
    return Side(ids, mask, length, prompt_tokens)


def _final_reply_start(mask: list[int]) -> int:
    """Index of the first token of the last run of trainable tokens (len(mask) when none)."""
    k = len(mask)
    while k > 0 and not mask[k - 1]:
        k -= 1
    while k > 0 and mask[k - 1]:
        k -= 1
    return k if any(mask) else len(mask)

"""Row formats and validation: every accepted row becomes (chosen messages, rejected messages).

1. ``conversational``: ``chosen`` and ``rejected`` are full conversations (lists of {role, content}).
2. ``prompt``: ``prompt`` + ``chosen`` + ``rejected``; each a string or a list of messages.
3. ``hh``: ``chosen``/``rejected`` are strings of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns.
"""

from __future__ import annotations

import re

from dpocache.data.errors import DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("conversational", "prompt", "hh")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def detect_format(row: object) -> str | None:
    """Guess a row's format from its columns (None when no format fits)."""
    if not isinstance(row, dict):
        return None
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        first = chosen[0] if chosen else None
        # TRL conversational prompt format: prompt messages + a chosen/rejected assistant reply.
        if "prompt" in row and isinstance(first, dict) and first.get("role") == "assistant":
            return "prompt"
        return "conversational"  # full conversations (e.g. ultrafeedback: its prompt column is ignored)
    if "prompt" in row:
        return "prompt"
    if isinstance(chosen, str) and "\n\nHuman:" in chosen and "\n\nAssistant:" in chosen:
        return "hh"
    return None


def _messages(value: object, src: str, row: str, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(src, row, f"`{field}` must be a list of messages, got {type(value).__name__}",
                        reason="wrong_type")
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(src, row, f"`{field}`[{k}] must be a {{role, content}} object, got "
                            f"{type(msg).__name__}", reason="wrong_type")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(src, row, f"`{field}`[{k}] has unknown role {role!r} (expected system, user or "
                            "assistant)", reason="unknown_role")
        if not isinstance(content, str):
            raise DataError(src, row, f"`{field}`[{k}].content must be a string, got {type(content).__name__}",
                            reason="wrong_type")
        out.append({"role": role, "content": content})
    return out


def _hh(text: object, src: str, row: str, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise DataError(src, row, f"`{field}` must be a string in the HH-RLHF format", reason="wrong_type")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(src, row, f"`{field}` is not a sequence of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns",
                        reason="bad_hh")
    return [{"role": "user" if who == "Human" else "assistant", "content": content}
            for who, content in zip(parts[1::2], parts[2::2])]


def _as_turns(value: object, role: str, src: str, row: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, src, row, field)


def normalize(raw: object, fmt: str, src: str, row: str) -> tuple[list[dict], list[dict]]:
    """Validate one raw row of format ``fmt`` and return (chosen, rejected) conversations."""
    if not isinstance(raw, dict):
        raise DataError(src, row, f"a row must be a JSON object, got {type(raw).__name__}", reason="wrong_type")
    for field in ("chosen", "rejected") + (("prompt",) if fmt == "prompt" else ()):
        if raw.get(field) is None:
            state = "null" if field in raw else "missing"
            raise DataError(src, row, f"`{field}` is {state}", reason=f"{state}_{field}")
    if fmt == "conversational":
        chosen = _messages(raw["chosen"], src, row, "chosen")
        rejected = _messages(raw["rejected"], src, row, "rejected")
    elif fmt == "prompt":
        prompt = _as_turns(raw["prompt"], "user", src, row, "prompt")
        chosen = prompt + _as_turns(raw["chosen"], "assistant", src, row, "chosen")
        rejected = prompt + _as_turns(raw["rejected"], "assistant", src, row, "rejected")
    elif fmt == "hh":
        chosen = _hh(raw["chosen"], src, row, "chosen")
        rejected = _hh(raw["rejected"], src, row, "rejected")
    else:
        raise DataError(src, row, f"unknown dataset format {fmt!r}", reason="bad_format")
    _check_pair(chosen, rejected, src, row)
    return chosen, rejected


def _check_pair(chosen: list[dict], rejected: list[dict], src: str, row: str) -> None:
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv:
            raise DataError(src, row, f"`{name}` is an empty conversation", reason="empty_conversation")
        if conv[-1]["role"] != "assistant":
            raise DataError(src, row, f"the last turn of `{name}` is {conv[-1]['role']!r}, not the assistant's",
                            reason="last_turn_not_assistant")
        if not conv[-1]["content"].strip():
            raise DataError(src, row, f"the assistant reply of `{name}` is empty", reason="empty_assistant")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(src, row, "the prompts (turns before the last) of chosen and rejected differ",
                        reason="prompt_mismatch")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise DataError(src, row, "chosen and rejected are identical", reason="identical_pair")

"""Row formats and validation: every accepted row becomes (chosen messages, rejected messages).

1. ``conversational``: ``chosen`` and ``rejected`` are full conversations (lists of {role, content}).
2. ``prompt``: ``prompt`` (or ``question``, or ShareGPT's ``conversations``) + ``chosen`` + ``rejected``; each a
   string, a message or a list of messages; a string ``system`` column becomes the system message.
3. ``hh``: ``chosen``/``rejected`` are strings of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns.

Messages are {role, content} objects (ShareGPT's {from, value} with human/gpt roles is read too; roles
are case-insensitive); a content may be a list of text parts ({"type": "text", "text": ...}), which are
joined.

Every defect raises :class:`DataError` with a short ``reason`` key used for the skip counts.
"""

from __future__ import annotations

import re

from dpocache.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("conversational", "prompt", "hh")
PROMPT_KEYS = ("prompt", "question", "conversations")  # the first present names the prompt column
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                   "assistant": "assistant", "tool": "tool"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def detect_format(row: object) -> str | None:
    """Guess a row's format from its columns (None when no format fits).

    A ``prompt`` column next to full conversations (ultrafeedback_binarized) is the conversational
    format: the chosen conversation already holds the prompt turn.
    """
    if not isinstance(row, dict):
        return None
    chosen, rejected = row.get("chosen"), row.get("rejected")
    has_prompt = _prompt_key(row) is not None
    if isinstance(chosen, list) and isinstance(rejected, list):
        if has_prompt and not _has_non_assistant_turn(chosen):
            return "prompt"  # TRL conversational: prompt messages + assistant-only completions
        return "conversational"
    if has_prompt:
        return "prompt"
    if isinstance(chosen, str) and "\n\nHuman:" in chosen and "\n\nAssistant:" in chosen:
        return "hh"
    return None


def _prompt_key(row: dict) -> str | None:
    return next((k for k in PROMPT_KEYS if row.get(k) is not None), None)


def _role_of(message: dict) -> object:
    role = message.get("role", message.get("from"))
    return _SHAREGPT_ROLES.get(role.strip().lower(), role) if isinstance(role, str) else role


def _has_non_assistant_turn(messages: list) -> bool:
    return any(isinstance(m, dict) and _role_of(m) != "assistant" for m in messages)


def _text(content: object, src: str, row: str, where: str) -> str:
    """A message content: a string, or a list of text parts joined (multimodal parts are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for k, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a {kind!r} part" if kind else f"a {type(part).__name__}"
                raise DataError(src, row, f"{where}[{k}] is {what}; only text parts ({{\"type\": \"text\", "
                                "\"text\": ...}) are supported", reason="wrong_type")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(src, row, f"{where} must be a string, got {type(content).__name__}", reason="wrong_type")


def _messages(value: object, src: str, row: str, field: str, *, allow_string: bool = False) -> list[dict]:
    if not isinstance(value, list):
        expected = "a string or a list of messages" if allow_string else "a list of {role, content} messages"
        raise DataError(src, row, f"`{field}` must be {expected}, got {type(value).__name__}", reason="wrong_type")
    out = []
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(src, row, f"`{field}`[{k}] must be a {{role, content}} object, got "
                            f"{type(msg).__name__}", reason="wrong_type")
        sharegpt = "role" not in msg and "from" in msg and "value" in msg
        role = _role_of(msg)  # "User", "human", "gpt": the roles' usual spellings
        content, key = (msg["value"], "value") if sharegpt else (msg.get("content"), "content")
        if role not in ROLES:
            raise DataError(src, row, f"`{field}`[{k}] has unknown role {role!r} (expected system, user, "
                            "assistant or tool)", reason="unknown_role")
        out.append({"role": role, "content": _text(content, src, row, f"`{field}`[{k}].{key}")})
    return out


def _hh(text: object, src: str, row: str, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise DataError(src, row, f"`{field}` must be a string of HH-RLHF turns, got {type(text).__name__}",
                        reason="wrong_type")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(src, row, f"`{field}` is not a sequence of '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns",
                        reason="bad_hh")
    return [{"role": "user" if who == "Human" else "assistant", "content": content}
            for who, content in zip(parts[1::2], parts[2::2])]


def _completion(value: object, prompt: list[dict], src: str, row: str, field: str) -> list[dict]:
    """The full conversation of a prompt-format side: prompt + completion.

    A completion that is itself a full conversation starting with the prompt is taken as it is.
    """
    if isinstance(value, str):
        return prompt + [{"role": "assistant", "content": value}]
    turns = _messages([value] if isinstance(value, dict) else value, src, row, field, allow_string=True)
    if _has_non_assistant_turn(turns) and turns[: len(prompt)] == prompt:
        return turns
    return prompt + turns


def normalize(raw: object, fmt: str, src: str, row: str) -> tuple[list[dict], list[dict]]:
    """Validate one raw row of format ``fmt`` and return (chosen, rejected) conversations."""
    if not isinstance(raw, dict):
        raise DataError(src, row, f"a row must be an object with chosen/rejected fields, got {type(raw).__name__}",
                        reason="wrong_type")
    prompt_key = (_prompt_key(raw) or "prompt") if fmt == "prompt" else None
    for field in ("chosen", "rejected") + ((prompt_key,) if prompt_key else ()):
        if raw.get(field) is None:
            state = "null" if field in raw else "missing"
            raise DataError(src, row, f"`{field}` is {state}", reason=f"{state}_{field}")
    if fmt == "conversational":
        chosen = _messages(raw["chosen"], src, row, "chosen")
        rejected = _messages(raw["rejected"], src, row, "rejected")
    elif fmt == "prompt":
        p = raw[prompt_key]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else \
            _messages([p] if isinstance(p, dict) else p, src, row, prompt_key, allow_string=True)
        system = raw.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(src, row, f"`system` must be a string, got {type(system).__name__}", reason="wrong_type")
        if system and system.strip() and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
        chosen = _completion(raw["chosen"], prompt, src, row, "chosen")
        rejected = _completion(raw["rejected"], prompt, src, row, "rejected")
    elif fmt == "hh":
        chosen = _hh(raw["chosen"], src, row, "chosen")
        rejected = _hh(raw["rejected"], src, row, "rejected")
    else:
        raise DataError(src, row, f"unknown dataset format {fmt!r} (expected one of {', '.join(FORMATS)})",
                        reason="bad_format")
    check_pair(chosen, rejected, src, row)
    return chosen, rejected


def check_pair(chosen: list[dict], rejected: list[dict], src: str, row: str) -> None:
    """Pair-level rules: both end with a non-empty assistant reply, same prompt, different replies."""
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv:
            raise DataError(src, row, f"`{name}` is an empty conversation", reason="empty_conversation")
        if conv[-1]["role"] != "assistant":
            raise DataError(src, row, f"the last turn of `{name}` is {conv[-1]['role']!r}, not the assistant's",
                            reason="last_turn_not_assistant")
        for k, msg in enumerate(conv):
            if msg["role"] == "assistant" and not msg["content"].strip():
                which = "reply" if k == len(conv) - 1 else f"turn {k}"
                raise DataError(src, row, f"the assistant {which} of `{name}` is empty", reason="empty_assistant")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(src, row, "the prompts (turns before the last) of chosen and rejected differ",
                        reason="prompt_mismatch")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise DataError(src, row, "chosen and rejected are identical", reason="identical_pair")

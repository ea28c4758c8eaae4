"""Built-in chat templates and tokenizer preparation (template, pad token distinct from EOS)."""

from __future__ import annotations

from dpocache.data.errors import DataError

_TULU_BODY = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    # Tulu 2/3 (open-instruct's "tulu").
    "tulu": _TULU_BODY,
    # OLMo 2: the Tulu format preceded by the BOS token.
    "olmo": "{{ bos_token }}" + _TULU_BODY,
    # ChatML.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def prepare_tokenizer(tokenizer, cfg) -> tuple[object, bool]:
    """Set the chat template and a pad token distinct from EOS. Returns (tokenizer, vocabulary grew)."""
    if cfg.chat_template_name:
        if cfg.chat_template_name not in CHAT_TEMPLATES:
            raise DataError("--chat_template_name", None, f"unknown template {cfg.chat_template_name!r} "
                            f"(built in: {', '.join(CHAT_TEMPLATES)})", reason="config")
        tokenizer.chat_template = CHAT_TEMPLATES[cfg.chat_template_name]
    elif not getattr(tokenizer, "chat_template", None):
        raise DataError(getattr(tokenizer, "name_or_path", "tokenizer"), None,
                        "the tokenizer has no chat template; pass --chat_template_name "
                        f"({', '.join(CHAT_TEMPLATES)})", reason="config")
    grew = False
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [tokenizer.unk_token] + list(getattr(tokenizer, "all_special_tokens", []))
        eos = tokenizer.eos_token
        usable = [t for t in candidates if t and t != eos and t != tokenizer.bos_token
                  and "im_start" not in t and "im_end" not in t]
        if usable:
            tokenizer.pad_token = usable[0]
        else:
            before = len(tokenizer)
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            grew = len(tokenizer) > before
    return tokenizer, grew

"""Built-in chat templates and tokenizer preparation (template, pad token distinct from EOS).

The built-in templates are Jinja strings written from their public definitions:

- ``tulu``: open-instruct's Tulu 2/3 format (``<|user|>\\n...\\n<|assistant|>\\n...EOS``);
- ``olmo``: the template published with the OLMo 2 (1124) models: the Tulu format after the BOS token;
- ``chatml``: plain ChatML (``<|im_start|>role\\n...<|im_end|>\\n``), with no default system prompt.
"""

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
    "tulu": _TULU_BODY,
    "olmo": "{{ bos_token }}" + _TULU_BODY,
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def template_label(tokenizer, cfg) -> str:
    """How error messages name the chat template in use."""
    if getattr(cfg, "chat_template_name", None):
        return f"built-in chat template {cfg.chat_template_name!r}"
    return f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'!r}"


def _set_template(tokenizer, cfg) -> None:
    name = cfg.chat_template_name
    if name:
        if name not in CHAT_TEMPLATES:
            raise DataError("--chat_template_name", None, f"unknown template {name!r} (built in: "
                            f"{', '.join(CHAT_TEMPLATES)})", reason="config")
        tokenizer.chat_template = CHAT_TEMPLATES[name]
    elif not getattr(tokenizer, "chat_template", None):
        raise DataError(getattr(tokenizer, "name_or_path", "") or "tokenizer", None,
                        "the tokenizer has no chat template; pass --chat_template_name "
                        f"({', '.join(CHAT_TEMPLATES)})", reason="config")
    if isinstance(tokenizer.chat_template, dict):  # several named templates: the "default" one renders chats
        if "default" not in tokenizer.chat_template:
            raise DataError(getattr(tokenizer, "name_or_path", "") or "tokenizer", None, "the tokenizer has several "
                            f"chat templates ({', '.join(tokenizer.chat_template)}) and none named 'default'; pass "
                            "--chat_template_name", reason="config")
        tokenizer.chat_template = tokenizer.chat_template["default"]


def _pad_candidates(tokenizer) -> list[str]:
    """Existing special tokens usable as padding: not EOS/BOS and not used by the chat template."""
    template = tokenizer.chat_template or ""
    candidates = [tokenizer.unk_token] + list(getattr(tokenizer, "all_special_tokens", []))
    out = []
    for tok in candidates:
        if tok and tok not in (tokenizer.eos_token, tokenizer.bos_token) and tok not in template and tok not in out:
            out.append(tok)
    return out


def prepare_tokenizer(tokenizer, cfg) -> tuple[object, bool]:
    """Set the chat template and a pad token distinct from EOS. Returns (tokenizer, vocabulary grew).

    When the pad token is missing or equals EOS, an existing special token that is neither EOS nor
    BOS nor used by the chat template (unk first) becomes the pad token; failing that ``<pad>`` is
    added, and the returned flag tells the caller to resize the model's embeddings.
    """
    _set_template(tokenizer, cfg)
    if getattr(cfg, "add_bos", False) and tokenizer.bos_token_id is None:
        raise DataError("--add_bos", None, f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no BOS token",
                        reason="config")
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer, False
    usable = _pad_candidates(tokenizer)
    if usable:
        tokenizer.pad_token = usable[0]
        return tokenizer, False
    before = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer, len(tokenizer) > before

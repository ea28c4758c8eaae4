"""Data layer: every source kind and format, templates, masking, mixtures, the example hash."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.data import CHAT_TEMPLATES, DataConfig, DataError, load_preference_data, prepare_tokenizer


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))


def prepared(tokenizer, **kw):
    cfg = DataConfig(**kw)
    tok, _ = prepare_tokenizer(tokenizer, cfg)
    return load_preference_data(cfg, tok, progress=False), tok


def trainable_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_conversational_jsonl_with_extra_columns(tokenizer, tmp_path):
    rows = conversational_rows(5)
    for i, r in enumerate(rows):  # ultrafeedback-like extras: a prompt string, ids, scores
        r.update(prompt=r["chosen"][0]["content"], prompt_id=str(i), score_chosen=8.0, messages=r["chosen"])
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    data, tok = prepared(tokenizer, dataset=str(path))
    assert data.stats["sources"][0]["format"] == "conversational"
    assert len(data.dataset) == 5
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == rows[0]["chosen"][-1]["content"] + \
        "<|im_end|>\n"
    assert ex["chosen_mask"][0] == 0


def test_prompt_format_strings_parquet_and_messages_json(tokenizer, tmp_path):
    table = pa.table({"prompt": ["Say hi", "Count to 3"], "chosen": ["Hi!", "1 2 3"], "rejected": ["No.", "1 2"]})
    pq.write_table(table, tmp_path / "p.parquet")
    data, tok = prepared(tokenizer, dataset=str(tmp_path / "p.parquet"))
    assert data.stats["sources"][0]["format"] == "prompt"
    ex = data.dataset[1]
    assert trainable_text(tok, ex["rejected_input_ids"], ex["rejected_mask"]) == "1 2<|im_end|>\n"
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    data, tok = prepared(tokenizer, dataset=str(tmp_path / "m.json"))
    text = tok.decode(data.dataset[0]["chosen_input_ids"])
    assert "Be brief." in text and "You are a helpful AI assistant" not in text  # system message kept


def test_hh_rlhf_strings_from_save_to_disk(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({
        "chosen": ["\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."],
        "rejected": ["\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away."]})
    ds.save_to_disk(tmp_path / "hh")
    data, tok = prepared(tokenizer, dataset=str(tmp_path / "hh"))
    assert data.stats["sources"][0]["format"] == "hh"
    ex = data.dataset[0]
    # all assistant turns are trainable by default, the final one only with final_turn
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == \
        "Hello!<|im_end|>\nFine, thanks.<|im_end|>\n"
    data, tok = prepared(tokenizer, dataset=str(tmp_path / "hh"), mask_mode="final_turn")
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == "Fine, thanks.<|im_end|>\n"


def test_dataset_repository_folder_and_compressed_files(tokenizer, tmp_path):
    """A downloaded dataset repository: splits found by the `datasets` file-name conventions, in a data/
    subfolder; JSON Lines compressed with gzip, bz2 or xz."""
    import bz2
    import gzip
    import lzma

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    rows = conversational_rows(9, seed=2)
    pq.write_table(pa.Table.from_pylist(rows[:3]), repo / "data" / "train_prefs-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:5]), repo / "data" / "train_prefs-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[5:7]), repo / "data" / "test_prefs-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[7:]), repo / "data" / "train_sft-00000-of-00001.parquet")
    data, _ = prepared(tokenizer, dataset=str(repo), mixer_list_splits=["train_prefs"])
    assert len(data.dataset) == 5  # not the train_sft or test_prefs files
    data, _ = prepared(tokenizer, dataset=str(repo), mixer_list_splits=["test_prefs"])
    assert len(data.dataset) == 2
    with pytest.raises(DataError, match="no data files for split 'train' .*splits found by file name: test_prefs, "
                                        "train_prefs, train_sft"):
        prepared(tokenizer, dataset=str(repo))
    text = "".join(json.dumps(r) + "\n" for r in rows[:4]).encode()
    for suffix, compress in ((".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress), (".json.xz", lzma.compress)):
        path = tmp_path / f"prefs{suffix}"
        path.write_bytes(compress(text))
        data, _ = prepared(tokenizer, dataset=str(path))
        assert len(data.dataset) == 4, suffix
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(text)[:-30])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz, line \d+: the file cannot be read on"):
        prepared(tokenizer, dataset=str(broken))


def test_schema_variants_of_public_preference_sets(tokenizer, tmp_path):
    """orca_dpo_pairs (system/question), truthy-dpo (system/prompt), text-part contents, ShareGPT messages,
    a single-message completion, and a tool turn."""
    def user(text):
        return {"role": "user", "content": text}

    tool_turns = [user("Weather?"), {"role": "assistant", "content": "Checking."}, {"role": "tool", "content": "sun"}]
    rows = [
        {"system": "Be terse.", "question": "2+2?", "chosen": "4", "rejected": "5"},
        {"system": "", "prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {"chosen": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}],
         "rejected": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                      {"role": "assistant", "content": "Go"}]},
        {"chosen": [{"from": "human", "value": "Name a color"}, {"from": "gpt", "value": "Blue"}],
         "rejected": [{"from": "human", "value": "Name a color"}, {"from": "gpt", "value": "Seven"}]},
        {"prompt": [user("Pick a fruit")], "chosen": {"role": "assistant", "content": "Apple"},
         "rejected": {"role": "assistant", "content": "Rock"}},
        {"conversations": [{"from": "human", "value": "Say yes"}], "chosen": {"from": "gpt", "value": "Yes"},
         "rejected": {"from": "gpt", "value": "No"}},
        {"chosen": [{"role": "User", "content": "Up?"}, {"role": "Assistant", "content": "Up."}],
         "rejected": [{"role": "User", "content": "Up?"}, {"role": "Assistant", "content": "Down."}]},
        {"chosen": [*tool_turns, {"role": "assistant", "content": "Sunny."}],
         "rejected": [*tool_turns, {"role": "assistant", "content": "Rainy."}]},
    ]
    mixer = []  # one source per row: the format is detected per source
    for i, row in enumerate(rows):
        mixer += [str(write_jsonl(tmp_path / f"r{i}.jsonl", [row])), "1"]
    data, tok = prepared(tokenizer, mixer_list=mixer)
    texts = [tok.decode(ids) for ids in data.dataset["chosen_input_ids"]]
    assert [s["format"] for s in data.stats["sources"]] == ["prompt", "prompt", "conversational", "conversational",
                                                             "prompt", "prompt", "conversational", "conversational"]
    assert texts[0].startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>")
    assert "<|im_start|>system\n<|im_end|>" not in texts[1]  # an empty system column adds no system turn
    assert "<|im_start|>user\nHi there<|im_end|>" in texts[2]
    assert "<|im_start|>user\nName a color<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>" in texts[3]
    assert texts[4].endswith("<|im_start|>assistant\nApple<|im_end|>\n")
    assert texts[5].endswith("<|im_start|>user\nSay yes<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n")
    assert texts[6].endswith("<|im_start|>user\nUp?<|im_end|>\n<|im_start|>assistant\nUp.<|im_end|>\n")
    ex = data.dataset[7]
    assert "<|im_start|>tool\nsun<|im_end|>" in texts[7]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == "Checking.<|im_end|>\nSunny.<|im_end|>\n"
    image = {"chosen": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                        {"role": "assistant", "content": "A cat"}],
             "rejected": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]},
                          {"role": "assistant", "content": "A dog"}]}
    path = write_jsonl(tmp_path / "img.jsonl", [image])
    with pytest.raises(DataError, match=r"img\.jsonl, line 1: `chosen`\[0\]\.content\[0\] is a 'image' part; "
                                        "only text parts"):
        prepared(tokenizer, dataset=str(path))


CARD_REPLY = ("I'm just a computer program, so I don't have feelings, but I'm functioning as expected. "
              "How can I assist you today?")
CARD_CHAT = [{"role": "user", "content": "How are you doing?"}, {"role": "assistant", "content": CARD_REPLY}]
MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
              {"role": "assistant", "content": "Goodbye."}]


@pytest.mark.parametrize("name, chat, expected", [
    # allenai/Llama-3.1-Tulu-3-8B model card, "Chat template"
    ("tulu", CARD_CHAT, "<|user|>\nHow are you doing?\n<|assistant|>\n" + CARD_REPLY + "<|endoftext|>"),
    # allenai/OLMo-2-1124-7B-Instruct model card, "Chat template" (the OLMo 2 tokenizer: bos = eos = <|endoftext|>)
    ("olmo", CARD_CHAT, "<|endoftext|><|user|>\nHow are you doing?\n<|assistant|>\n" + CARD_REPLY + "<|endoftext|>"),
    # Tulu's documented turns: <|system|>/<|user|>/<|assistant|> headers on their own line, each reply closed by EOS,
    # and a newline before the next turn
    ("tulu", MULTI_TURN, "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.<|endoftext|>\n<|user|>\nBye\n"
                         "<|assistant|>\nGoodbye.<|endoftext|>"),
    # ChatML as OpenAI documented it (and Qwen's cards render it): every message <|im_start|>ROLE\n...<|im_end|>\n
    ("chatml", MULTI_TURN, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                           "<|im_start|>assistant\nGoodbye.<|im_end|>\n"),
])
def test_builtin_templates_render_as_published(tokenizer, name, chat, expected):
    """The built-in templates render conversations exactly as their model cards show them, with the special
    tokens of the tokenizers they ship with (Tulu 3 / OLMo 2 cards: EOS and BOS <|endoftext|>)."""
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == expected


@pytest.mark.parametrize("name, expected", [
    ("tulu", "<|user|>\nYour message here!\n<|assistant|>\n"),  # Tulu 2 card: "add a newline after <|assistant|>"
    ("olmo", "<|endoftext|><|user|>\nYour message here!\n<|assistant|>\n"),
    ("chatml", "<|im_start|>user\nYour message here!<|im_end|>\n<|im_start|>assistant\n"),
])
def test_builtin_templates_generation_prompt(tokenizer, name, expected):
    tokenizer.eos_token = tokenizer.bos_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    chat = [{"role": "user", "content": "Your message here!"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == expected


def test_tulu_template_masks_and_truncation(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", conversational_rows(6))
    data, tok = prepared(tokenizer, dataset=str(path), chat_template_name="tulu")
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]).endswith(tok.eos_token)
    full_len = min(len(x) for x in data.dataset["rejected_input_ids"])
    prompt_len = min(m.index(1) for m in data.dataset["rejected_mask"])
    limit = (prompt_len + full_len) // 2 + 1
    short, _ = prepared(tokenizer, dataset=str(path), chat_template_name="tulu", max_seq_length=limit)
    assert all(len(x) <= limit for x in short.dataset["rejected_input_ids"])
    assert short.stats["totals"]["truncated"] > 0 and short.stats["totals"]["kept"] > 0
    # below the prompt length nothing trainable is left: every pair is dropped and counted
    with pytest.raises(Exception, match="no usable examples"):
        prepared(tokenizer, dataset=str(path), chat_template_name="tulu", max_seq_length=prompt_len - 2)


def test_pad_token_differs_from_eos(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2 ships pad == eos
    tok, grew = prepare_tokenizer(tokenizer, DataConfig())
    assert tok.pad_token_id != tok.eos_token_id and not grew


def test_prompt_format_forced_on_full_conversations_does_not_repeat_the_prompt(tokenizer, tmp_path):
    rows = conversational_rows(3)
    for r in rows:
        r["prompt"] = r["chosen"][0]["content"]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    auto, tok = prepared(tokenizer, dataset=str(path))
    forced, _ = prepared(tokenizer, dataset=str(path), dataset_format="prompt")
    assert forced.stats["sources"][0]["format"] == "prompt"
    assert forced.dataset["hash"] == auto.dataset["hash"]
    assert tok.decode(forced.dataset[0]["chosen_input_ids"]).count(rows[0]["prompt"]) == 1


def test_generation_block_templates_use_the_tokenizer_assistant_mask(tokenizer, tmp_path):
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "mt.jsonl", [{
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                   {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}],
        "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                     {"role": "user", "content": "b"}, {"role": "assistant", "content": "wrong"}]}])
    data, tok = prepared(tokenizer, dataset=str(path))
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == "first<|im_end|>second<|im_end|>"
    data, tok = prepared(tokenizer, dataset=str(path), mask_mode="final_turn")
    ex = data.dataset[0]
    assert trainable_text(tok, ex["rejected_input_ids"], ex["rejected_mask"]) == "wrong<|im_end|>"


def test_template_breaking_the_prefix_property_is_named(tokenizer, tmp_path):
    # The last assistant turn ends with <|endoftext|>, earlier ones with <|im_end|>\n: no prefix property.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' and loop.last %}{{ '<|endoftext|>' }}{% else %}{{ '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
             "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "b"}, {"role": "assistant", "content": "z"}]}]
    path = write_jsonl(tmp_path / "mt.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepared(tokenizer, dataset=str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 1: the chat template of tokenizer ")
    assert "renders assistant turn 1 differently when it is the last message" in msg
    data, tok = prepared(tokenizer, dataset=str(path), mask_mode="final_turn")  # only the last turn: fine
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == "y<|endoftext|>"


def test_template_that_decorates_only_the_final_reply(tokenizer, tmp_path):
    """Qwen3-style: the reply after the last user turn gets an empty reasoning block, earlier replies do not.
    Earlier turns are found verbatim inside the conversation; a template that rewrites them is still refused."""
    tokenizer.chat_template = (
        "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' and loop.index0 > ns.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
        "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
             {"role": "user", "content": "b"}]
    rows = [{"chosen": turns + [{"role": "assistant", "content": "second"}],
             "rejected": turns + [{"role": "assistant", "content": "wrong"}]}]
    path = write_jsonl(tmp_path / "mt.jsonl", rows)
    data, tok = prepared(tokenizer, dataset=str(path))
    ex = data.dataset[0]
    assert trainable_text(tok, ex["chosen_input_ids"], ex["chosen_mask"]) == \
        "first<|im_end|>\n<think>\n\n</think>\n\nsecond<|im_end|>\n"
    assert tok.decode(ex["chosen_input_ids"]).count("<think>") == 1  # history rendered as the model sees it
    tokenizer.chat_template = tokenizer.chat_template.replace("m['content'] +", "m['content'] | upper +")
    with pytest.raises(DataError, match="renders assistant turn 1 differently"):
        prepared(tokenizer, dataset=str(path))


def test_pad_token_is_added_when_no_special_token_is_free(tokenizer):
    # GPT-2 style: unk = bos = eos; the remaining special tokens are used by the chat template.
    tokenizer.eos_token = tokenizer.unk_token = tokenizer.pad_token = "<|endoftext|>"
    before = len(tokenizer)
    tok, grew = prepare_tokenizer(tokenizer, DataConfig(chat_template_name="chatml"))
    assert grew and len(tok) == before + 1
    assert tok.pad_token == "<pad>" and tok.pad_token_id == before

"""Data layer: every source kind and format, templates, masking, mixtures, the example hash."""

import hashlib
import json
import struct
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import conversational_rows, write_jsonl
from dpocache.data import CHAT_TEMPLATES, DataConfig, example_hash, load_preference_data, prepare_tokenizer


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


@pytest.mark.parametrize("name,expected", [
    ("tulu", "<|system|>\nS\n<|user|>\nQ\n<|assistant|>\nA<|im_end|>\n<|user|>\nQ2\n<|assistant|>\nA2<|im_end|>"),
    ("olmo", "<|im_start|><|system|>\nS\n<|user|>\nQ\n<|assistant|>\nA<|im_end|>\n<|user|>\nQ2\n<|assistant|>\n"
             "A2<|im_end|>"),
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
               "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"),
])
def test_builtin_templates_render_as_written(tokenizer, name, expected):
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == expected


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


def test_mixer_fractions_counts_upsampling_and_determinism(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", conversational_rows(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", conversational_rows(8, seed=2))
    data, _ = prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"])
    assert data.stats["sources"][0]["selected"] == 5 and data.stats["sources"][1]["selected"] == 3
    assert len(data.hashes) == 8
    again, _ = prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"])
    assert again.hashes == data.hashes
    other, _ = prepared(tokenizer, mixer_list=[str(a), "0.5", str(b), "3"], seed=7)
    assert other.hashes != data.hashes
    up, _ = prepared(tokenizer, mixer_list=[str(a), "2.5"])
    assert len(up.hashes) == 25 and len(up.dataset) == 10  # repeats train, unique examples are scored once
    capped, _ = prepared(tokenizer, mixer_list=[str(a), "1.0", str(b), "1.0"], max_train_samples=12)
    assert len(capped.hashes) == 12


def test_duplicates_collapse_and_are_counted(tokenizer, tmp_path):
    rows = conversational_rows(4)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:2])
    data, _ = prepared(tokenizer, dataset=str(path))
    assert len(data.dataset) == 4 and data.stats["totals"]["duplicates"] == 2


def _golden(c_ids, c_mask, r_ids, r_mask):
    h = hashlib.sha256(b"dpocache-example-v1\0")
    for values, fmt in ((c_ids, "<i"), (c_mask, "<b"), (r_ids, "<i"), (r_mask, "<b")):
        h.update(struct.pack("<Q", len(values)) + b"".join(struct.pack(fmt, v) for v in values))
    return h.hexdigest()


def test_example_hash_golden_and_stable_across_processes():
    args = ([1, 2, 3, 40000], [0, 0, 1, 1], [1, 2, 5], [0, 0, 1])
    assert example_hash(*args) == _golden(*args)
    # Golden values: a change of the encoding must bump HASH_VERSION (and invalidate stores knowingly).
    assert example_hash(*args) == "824a85b22521604ed8975f2764fc86506bc4b6608121c5f6d23b8821e2b1d013"
    assert example_hash([], [], [7], [0]) == "7344d7810bda0f58ebb0411ef0129651c58aa45a558f13c2799203939bd25fe0"
    assert example_hash(*args) == example_hash(*[np.array(a) for a in args])
    assert example_hash(*args) != example_hash([1, 2, 3, 40000], [0, 1, 1, 1], [1, 2, 5], [0, 0, 1])
    code = "from dpocache.data import example_hash; print(example_hash([1,2,3,40000],[0,0,1,1],[1,2,5],[0,0,1]))"
    for seed in ("0", "123"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}, check=True).stdout.strip()
        assert out == example_hash(*args)

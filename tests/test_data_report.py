"""`dpocache data`: the summary of a dataset or mixture, checked against independent tokenization."""

import json

import numpy as np
import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.cli import main
from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer
from dpocache.data.report import format_summary, summarize


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))


def test_summary_token_statistics_and_truncation(tokenizer_dir, tokenizer, tmp_path):
    rows = conversational_rows(12)
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:3] + [{"chosen": [], "rejected": []}])
    full = [len(tokenizer.apply_chat_template(r["rejected"], tokenize=True, return_dict=False)) for r in rows]
    prompt = [len(tokenizer.apply_chat_template(r["chosen"][:-1], tokenize=True, add_generation_prompt=True,
                                                return_dict=False)) for r in rows]
    limit = int(np.median(full))
    cfg = DataConfig(dataset=str(path), tokenizer_name_or_path=str(tokenizer_dir), max_seq_length=limit,
                     on_bad_row="skip")
    summary = summarize(cfg)
    src = summary["sources"][0]
    assert (src["format"], src["rows_read"], src["kept"], src["duplicates"]) == ("conversational", 16, 12, 3)
    assert src["dropped"] == {"empty_conversation": 1}
    assert summary["tokens"]["prompt"]["mean"] == round(float(np.mean(prompt)), 2)
    assert summary["tokens"]["rejected_response"]["max"] == max(f - p for f, p in zip(full, prompt))
    assert summary["would_truncate"] == sum(f > limit for f in full)  # rejected is the longer side here
    assert summary["would_drop"] == sum(p >= limit for p in prompt) == 0
    assert json.loads(json.dumps(summary)) == summary
    text = format_summary(summary)
    assert f"{path} [train] format=conversational amount=1.0: read 16, kept 12, dropped 1 (empty_conversation: 1)" \
        in text and f"{summary['would_truncate']} pairs would be truncated" in text


def test_cli_data_json_without_tokenizer(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", conversational_rows(5))
    assert main(["data", "--dataset", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sources"][0]["kept"] == 5 and out["totals"]["rows_read"] == 5 and "tokenizer" in out["note"]


def long_prompt_rows(n: int, seed: int = 5):
    """Rows whose prompt alone is longer than 64 tokens: truncated to 64 they keep no trainable token."""
    rows = conversational_rows(n, seed=seed)
    for row in rows:
        for side in ("chosen", "rejected"):
            row[side][0]["content"] += " Please explain every step in detail." * 12
    return rows


def test_data_reports_what_training_gets_per_source(tokenizer_dir, tokenizer, tmp_path, capsys):
    a = write_jsonl(tmp_path / "tulu.jsonl", conversational_rows(30, seed=1) + long_prompt_rows(4))
    b = write_jsonl(tmp_path / "uf.jsonl", conversational_rows(20, seed=2))
    args = ["--mixer_list", str(a), "1.0", str(b), "10", "--max_train_samples", "12", "--max_seq_length", "64",
            "--tokenizer_name_or_path", str(tokenizer_dir)]
    assert main(["data", *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sources = summary["sources"]
    # the 4 long-prompt rows are dropped by truncation: 30 + 10 selected, the cap of 12 shared 9 + 3
    assert [(s["kept"], s["selected"], s["train_examples"]) for s in sources] == [(30, 30, 9), (20, 10, 3)]
    assert summary["totals"]["dropped_by_reason"] == {"no_trainable_tokens_after_truncation": 4} \
        and summary["would_drop"] == 4 and summary["totals"]["examples"] == 12
    # exactly what stage one scores and stage two trains on
    cfg = DataConfig(mixer_list=[str(a), "1.0", str(b), "10"], max_train_samples=12, max_seq_length=64)
    tok, _ = prepare_tokenizer(tokenizer, cfg)
    data = load_preference_data(cfg, tok, progress=False)
    per_source = [prepared_hashes(tokenizer, tmp_path, path) for path in (a, b)]
    assert [sum(h in hs for h in data.hashes) for hs in per_source] == [s["train_examples"] for s in sources]
    assert summary["list_name"] == data.name
    assert main(["data", *args]) == 0
    text = capsys.readouterr().out
    assert f"{b} [train] format=conversational amount=10: read 20, kept 20" in text
    assert "selected 10, trains on 3 (after the max_train_samples cap)" in text


def prepared_hashes(tokenizer, tmp_path, path) -> set[str]:
    cfg = DataConfig(dataset=str(path), max_seq_length=64)
    tok, _ = prepare_tokenizer(tokenizer, cfg)
    return set(load_preference_data(cfg, tok, progress=False).hashes)

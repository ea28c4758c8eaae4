"""`dpocache data`: the summary of a dataset or mixture, checked against independent tokenization."""

import json

import numpy as np
import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.cli import main
from dpocache.data import DataConfig
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

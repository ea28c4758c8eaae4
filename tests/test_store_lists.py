"""Store lists and identity: readable, unique and stable list names, held-out lists marked by role, the
reference shown first by `inspect`, and `inspect --dataset` tokenizing with the model the manifest records."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import conversational_rows, write_jsonl
from test_store_rows import make_row, row_hash, write_rows

from dpocache.artifacts import ReferenceStore, StoreError, inspect_store
from dpocache.cli import main
from dpocache.config import ConfigError
from dpocache.stages.train.examples import pick_list

A, B = "a" * 64, "b" * 64


def test_default_names_stay_readable_unique_and_stable(tmp_path):
    hashes = [row_hash(i) for i in range(4)]
    store = write_rows(tmp_path / "s", [make_row(i) for i in range(4)])
    assert store.free_list_name("prefs", A) == "prefs"
    assert store.record_list("prefs", hashes, mixture_sha256=A, rename_if_taken=True) == "prefs"
    assert store.record_list("prefs", hashes[:2], mixture_sha256=A, rename_if_taken=True) == "prefs"  # replaced
    assert store.free_list_name("prefs", B) == "prefs-bbbbbbbb"
    assert store.record_list("prefs", hashes[:3], mixture_sha256=B, rename_if_taken=True) == "prefs-bbbbbbbb"
    assert store.record_list("prefs", hashes[:3], mixture_sha256=B, rename_if_taken=True) == "prefs-bbbbbbbb"
    assert store.lists() == {"prefs": 2, "prefs-bbbbbbbb": 3}
    # a name the user chose replaces whatever list holds it
    assert store.record_list("prefs", hashes, role="heldout", mixture_sha256=B) == "prefs"
    entries = ReferenceStore.open(tmp_path / "s").list_entries()
    assert {k: (v["count"], v["role"], v["mixture_sha256"]) for k, v in entries.items()} == {
        "prefs": (4, "heldout", B), "prefs-bbbbbbbb": (3, "train", B)}
    with pytest.raises(StoreError, match="role 'test' is not one of train, heldout"):
        store.record_list("x", hashes, role="test")


def test_training_picks_the_one_training_list_and_names_roles_otherwise(tmp_path):
    hashes = [row_hash(i) for i in range(4)]
    store = write_rows(tmp_path / "s", [make_row(i) for i in range(4)])
    store.record_list("mix", hashes)
    store.record_list("mix-heldout", hashes[:1], role="heldout")
    assert pick_list(ReferenceStore.open(tmp_path / "s"), None) == "mix"  # the held-out list is never the default
    assert pick_list(ReferenceStore.open(tmp_path / "s"), "mix-heldout") == "mix-heldout"  # unless asked for
    store.record_list("other", hashes[:2])
    with pytest.raises(ConfigError) as err:
        pick_list(ReferenceStore.open(tmp_path / "s"), None)
    assert str(err.value).endswith(
        "holds 2 training example lists (mix (4 examples, training), mix-heldout (1 examples, held-out), "
        "other (2 examples, training)): pick one with --store_dataset")


def test_old_manifests_without_roles_or_dates_still_read(tmp_path):
    hashes = [row_hash(i) for i in range(3)]
    store = write_rows(tmp_path / "s", [make_row(i) for i in range(3)])
    store.record_list("a", hashes)
    store.record_list("b", hashes[:1], role="heldout")
    data = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for key in ("created_at", "scored_at"):
        data.pop(key)
    for entry in data["lists"].values():
        entry.pop("role")
        entry.pop("mixture_sha256", None)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(data))
    old = ReferenceStore.open(tmp_path / "s")
    assert old.list_roles() == {"a": "train", "b": "train"} and old.get_list("a") == hashes
    report = inspect_store(tmp_path / "s", verify=True)
    assert report["ok"] and report["reference"]["created_at"] is None and report["lists"]["b"]["role"] == "train"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists_data")
    return (write_jsonl(root / "tulu3_pref.jsonl", conversational_rows(10, seed=31)),
            write_jsonl(root / "ultrafeedback.jsonl", conversational_rows(6, seed=32)))


def score(model, store, *data_args) -> str:
    return ["score", "--model_name_or_path", str(model), "--store", str(store), *data_args]


def list_of(out: str) -> str:
    return re.search(r"list '([^']+)'", out).group(1)


def test_scoring_names_lists_after_their_sources(sources, tiny_model_dir, tmp_path, capsys):
    tulu, uf = sources
    store = tmp_path / "store"
    assert main(score(tiny_model_dir, store, "--dataset", str(tulu))) == 0
    assert list_of(capsys.readouterr().out) == "tulu3_pref"
    assert main(score(tiny_model_dir, store, "--mixer_list", str(tulu), "1.0", str(uf), "1.0")) == 0
    assert list_of(capsys.readouterr().out) == "tulu3_pref+ultrafeedback"
    assert main(score(tiny_model_dir, store, "--mixer_list", str(tulu), "0.5")) == 0  # same source, other mixture
    other = list_of(capsys.readouterr().out)
    assert re.fullmatch(r"tulu3_pref-[0-9a-f]{8}", other)
    assert main(score(tiny_model_dir, store, "--dataset", str(tulu))) == 0  # the same mixture keeps its name
    assert list_of(capsys.readouterr().out) == "tulu3_pref"
    assert main(score(tiny_model_dir, store, "--dataset", str(uf), "--store_dataset", "uf_only")) == 0
    assert ReferenceStore.open(store).lists() == {"tulu3_pref": 10, "tulu3_pref+ultrafeedback": 16, other: 5,
                                                   "uf_only": 6}
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--store", str(store), "--output_dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds 4 training example lists (" in err and "tulu3_pref (10 examples, training)" in err, err


def test_inspect_shows_the_reference_first(sources, tiny_model_dir, tmp_path, capsys):
    tulu, _ = sources
    store = tmp_path / "store"
    assert main(score(tiny_model_dir, store, "--dataset", str(tulu))) == 0
    capsys.readouterr()
    assert main(["inspect", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ident = ReferenceStore.open(store).identity
    assert lines[0] == (f"reference: {tiny_model_dir}; dtype {ident['dtype']}, backend hf, max_seq_length "
                        f"{ident['max_seq_length']}")
    assert re.fullmatch(r"scored: created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, rows last added "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(UTC\)", lines[1])
    assert lines[2].startswith("libraries: dpocache ") and " torch " in lines[2] and " transformers " in lines[2]
    assert "  tulu3_pref: 10 examples (training)" in lines
    assert main(["inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert next(iter(report)) == "reference"
    ref = report["reference"]
    assert (ref["model"], ref["dtype"], ref["backend"]) == (str(tiny_model_dir), ident["dtype"], "hf")
    assert ref["created_at"] <= ref["scored_at"] and {"torch", "transformers", "pyarrow"} <= set(ref["libraries"])


def test_inspect_dataset_uses_the_recorded_model(sources, tiny_model_dir, tokenizer_dir, tmp_path, capsys):
    tulu, uf = sources
    model = shutil.copytree(tiny_model_dir, tmp_path / "reference_model")
    store = tmp_path / "store"
    assert main(score(model, store, "--dataset", str(tulu))) == 0
    capsys.readouterr()
    assert main(["inspect", str(store), "--dataset", str(tulu), "--json"]) == 0  # no tokenizer given
    assert json.loads(capsys.readouterr().out)["coverage"] == {"examples": 10, "present": 10, "missing": 0}
    # another tokenizer would tokenize differently: refused rather than reporting a wrong coverage
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["<not_in_the_reference>"])
    other.save_pretrained(tmp_path / "other_tok")
    assert main(["inspect", str(store), "--dataset", str(uf), "--tokenizer_name_or_path",
                 str(tmp_path / "other_tok")]) == 2
    err = capsys.readouterr().err
    assert "differs from the one" in err and "tokenizer_sha256" in err and err.count("\n") == 1, err
    shutil.rmtree(model)  # the store now lives where its reference is not available
    assert main(["inspect", str(store), "--dataset", str(uf)]) == 2
    err = capsys.readouterr().err
    assert f"was scored with '{model}', which is not available on this machine; pass --tokenizer_name_or_path" \
        in err and err.count("\n") == 1, err
    assert main(["inspect", str(store), "--dataset", str(uf), "--tokenizer_name_or_path", str(tiny_model_dir),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coverage"] == {"examples": 6, "present": 0, "missing": 6}

"""Identity fingerprints: weights (cached by path, size and mtime), tokenizer content, texts, versions."""

from __future__ import annotations

import hashlib
import json
import shutil

from dpocache.artifacts.identity import library_versions, text_fingerprint, tokenizer_fingerprint, weights_fingerprint
from dpocache.files import dpocache_home


def expected_fingerprint(files: dict[str, bytes]) -> str:
    """The documented definition, computed independently."""
    outer = hashlib.sha256(b"dpocache-weights-v1\0")
    for rel in sorted(files):
        outer.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).hexdigest().encode() + b"\0")
    return outer.hexdigest()


def test_weights_fingerprint_definition_and_file_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "model-00001.safetensors").write_bytes(b"one")
    (model / "sub" / "b.safetensors").write_bytes(b"two")
    (model / "pytorch_model.bin").write_bytes(b"ignored: safetensors preferred")
    (model / ".cache").mkdir()
    (model / ".cache" / "x.safetensors").write_bytes(b"ignored: hidden")
    (model / "config.json").write_text("{}")
    files = {"model-00001.safetensors": b"one", "sub/b.safetensors": b"two"}
    assert weights_fingerprint(model) == expected_fingerprint(files)
    assert weights_fingerprint(model / "sub" / "b.safetensors") == expected_fingerprint({"b.safetensors": b"two"})
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "pytorch_model.bin").write_bytes(b"w")
    (ckpt / "training_args.bin").write_bytes(b"not weights")
    (ckpt / "optimizer.pt").write_bytes(b"not weights")
    assert weights_fingerprint(ckpt) == expected_fingerprint({"pytorch_model.bin": b"w"})


def test_weights_fingerprint_is_cached_and_invalidated(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))
    assert dpocache_home() == tmp_path / "home"
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    first = weights_fingerprint(model)
    assert first == expected_fingerprint({"model.safetensors": weights.read_bytes()})
    cache_file = tmp_path / "home" / "hash-cache.json"
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    assert key.startswith(str(weights.resolve()) + "|")
    assert cache[key] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # a cache hit does not read the file: plant a different digest and it is used as is
    cache_file.write_text(json.dumps({key: "0" * 64}))
    planted = weights_fingerprint(model)
    assert planted != first
    outer = hashlib.sha256(b"dpocache-weights-v1\0" + b"model.safetensors\0" + b"0" * 64 + b"\0")
    assert planted == outer.hexdigest()
    # a changed file (new size/mtime) is hashed again and replaces its stale cache entry
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = weights_fingerprint(model)
    assert changed == expected_fingerprint({"model.safetensors": bytes(data)}) and changed != first
    assert len(json.loads(cache_file.read_text())) == 1
    # a corrupt cache file is tolerated and rebuilt
    cache_file.write_text("{not json")
    assert weights_fingerprint(model) == changed
    assert len(json.loads(cache_file.read_text())) == 1


def test_missing_weights_are_a_clear_error(tmp_path):
    import pytest

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_fingerprint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such model file or directory"):
        weights_fingerprint(tmp_path / "absent")


def test_tokenizer_fingerprint_tracks_content_not_paths(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    base = tokenizer_fingerprint(tokenizer)
    tokenizer.save_pretrained(tmp_path / "copy")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "copy")) == base
    tokenizer.add_tokens(["<extra_token_for_test>"])
    assert tokenizer_fingerprint(tokenizer) != base
    fresh = AutoTokenizer.from_pretrained(tmp_path / "copy")
    fresh.add_special_tokens({"pad_token": "<pad_for_test>"})
    assert tokenizer_fingerprint(fresh) != base


def test_text_fingerprint_and_versions():
    assert text_fingerprint("{{ messages }}") == hashlib.sha256(b"{{ messages }}").hexdigest()
    assert text_fingerprint("a") != text_fingerprint("a ")
    versions = library_versions()
    assert {"torch", "transformers", "pyarrow"} <= set(versions)
    json.dumps(versions)

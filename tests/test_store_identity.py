"""Identity fingerprints: weights (cached by path, device, inode, size, mtime, ctime), tokenizer content,
texts, versions."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

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


def cache_entries(home) -> dict:
    return json.loads((home / "hash-cache.json").read_text())["files"]


def settle() -> None:
    """Let the last write age past the window in which a file's ctime cannot be trusted (not a timed assert)."""
    time.sleep(0.25)


def stat_key(path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def test_weights_fingerprint_is_cached_and_invalidated(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))
    assert dpocache_home() == tmp_path / "home"
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    settle()
    first = weights_fingerprint(model)
    assert first == expected_fingerprint({"model.safetensors": weights.read_bytes()})
    cache = cache_entries(tmp_path / "home")
    assert cache == {str(weights.resolve()): {"stat": stat_key(weights),
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}
    # a cache hit does not read the file: plant a different digest and it is used as is
    plant_digest(tmp_path / "home", weights, "0" * 64)
    planted = weights_fingerprint(model)
    outer = hashlib.sha256(b"dpocache-weights-v1\0" + b"model.safetensors\0" + b"0" * 64 + b"\0")
    assert planted == outer.hexdigest() != first
    # a changed file (new size) is hashed again and replaces its stale cache entry
    data = bytearray(weights.read_bytes()) + b"x"
    weights.write_bytes(bytes(data))
    settle()
    changed = weights_fingerprint(model)
    assert changed == expected_fingerprint({"model.safetensors": bytes(data)}) and changed != first
    assert list(cache_entries(tmp_path / "home").values()) == [
        {"stat": stat_key(weights), "sha256": hashlib.sha256(bytes(data)).hexdigest()}]
    # a corrupt cache file is tolerated and rebuilt
    (tmp_path / "home" / "hash-cache.json").write_text("{not json")
    assert weights_fingerprint(model) == changed
    assert len(cache_entries(tmp_path / "home")) == 1


def plant_digest(home, weights, digest: str) -> None:
    path = home / "hash-cache.json"
    data = json.loads(path.read_text())
    data["files"][str(weights.resolve())]["sha256"] = digest
    path.write_text(json.dumps(data))


def test_a_file_rewritten_in_place_with_its_size_and_mtime_restored_is_hashed_again(tmp_path, monkeypatch):
    """The cache key holds device, inode, size, mtime_ns and ctime_ns: restoring size and mtime (os.utime) after
    an in-place rewrite does not restore ctime, so the new bytes get their own digest."""
    monkeypatch.setenv("DPOCACHE_HOME", str(tmp_path / "home"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    settle()
    old = weights_fingerprint(weights)
    assert old == expected_fingerprint({"model.safetensors": b"A" * 4096})
    plant_digest(tmp_path / "home", weights, "1" * 64)  # proves the next call is a cache hit
    assert weights_fingerprint(weights) != old
    before = os.stat(weights)
    with open(weights, "r+b") as fh:  # same inode, same size
        fh.write(b"B" * 4096)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(weights)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    new = weights_fingerprint(weights)
    assert new == expected_fingerprint({"model.safetensors": b"B" * 4096}) != old
    # just rewritten: its ctime is too recent to trust, so no entry is kept (the planted one is dropped) ...
    assert cache_entries(tmp_path / "home") == {}
    settle()
    assert weights_fingerprint(weights) == new
    # ... and once it has settled it is cached with its new key, and an unchanged file is a cache hit
    assert cache_entries(tmp_path / "home")[str(weights.resolve())]["stat"] == stat_key(weights)
    plant_digest(tmp_path / "home", weights, "2" * 64)
    assert weights_fingerprint(weights) != new
    # another file (new inode) moved into place with the same size and mtime is hashed again too
    other = tmp_path / "other.bin"
    other.write_bytes(b"C" * 4096)
    os.utime(other, ns=(after.st_atime_ns, after.st_mtime_ns))
    os.replace(other, weights)
    assert weights_fingerprint(weights) == expected_fingerprint({"model.safetensors": b"C" * 4096})


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

"""A full disk under every store write: one line naming the path and the space needed, nothing half-written,
a consistent store, and a rerun after freeing space that completes it.

The disk is a real small tmpfs when this process may mount one (root); otherwise writes through
dpocache's file helpers (every store write goes through them) fail with ENOSPC once a byte budget is
spent, injected at the file objects they write to. Both kinds run wherever tmpfs can be mounted.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import conversational_rows, write_jsonl
from test_store_rows import make_row, row_hash, sorted_rows, write_rows

import dpocache.files
from dpocache.artifacts import ReferenceStore, inspect_store
from dpocache.artifacts.identity import weights_fingerprint
from dpocache.cli import main
from dpocache.files import DiskFullError

PAGE = 4096


class SmallDisk:
    """A directory on a small file system whose free space the test sets (:meth:`fill`) and restores (:meth:`free`)."""

    def __init__(self, path: Path, monkeypatch, want_tmpfs: bool):
        self.path = path
        self.budget: int | None = None
        self.tmpfs = want_tmpfs and _mount_tmpfs(path)
        if not self.tmpfs:
            real_open = open

            def budgeted_open(file, mode="r", *args, **kwargs):
                fh = real_open(file, mode, *args, **kwargs)
                writes = any(c in mode for c in "wax+")
                return _Budgeted(fh, self) if writes and Path(file).resolve().is_relative_to(path) else fh

            monkeypatch.setattr(dpocache.files, "open", budgeted_open, raising=False)

    def fill(self, leave: int) -> None:
        """Leave ``leave`` bytes (a multiple of the page size) free."""
        if self.tmpfs:
            st = os.statvfs(self.path)
            with open(self.path / "filler", "wb") as fh:
                fh.write(b"\0" * (st.f_bavail * st.f_frsize - leave))
        else:
            self.budget = leave

    def free(self) -> None:
        if self.tmpfs:
            (self.path / "filler").unlink()
        else:
            self.budget = None

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


def _mount_tmpfs(path: Path) -> bool:
    """Mount a 2 MiB tmpfs on ``path``; False where this process may not (not root, no mount command)."""
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


class _Budgeted:
    """A file object whose writes fail with ENOSPC once the disk's byte budget is spent (a short write first)."""

    def __init__(self, fh, disk: SmallDisk):
        self._fh, self._disk = fh, disk

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        budget = self._disk.budget
        if budget is not None:
            if n > budget:
                self._fh.write(bytes(memoryview(data).cast("B")[:budget]))
                self._disk.budget = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)
            self._disk.budget = budget - n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, monkeypatch):
    path = tmp_path / "disk"
    path.mkdir()
    small = SmallDisk(path, monkeypatch, want_tmpfs=request.param == "tmpfs")
    yield small
    small.close()


def store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_consistent(root: Path) -> int:
    """No temporary or unlisted file, every byte and row verified; returns the number of rows."""
    manifest = json.loads((root / "manifest.json").read_text())
    listed = {s["path"] for s in manifest["shards"]} | {e["path"] for e in manifest["lists"].values()}
    files = [f for f in store_files(root) if f.startswith(("shards/", "lists/")) or ".tmp-" in f]
    assert sorted(files) == sorted(listed), files
    report = inspect_store(root, verify=True)
    assert report["ok"] and not report["orphan_files"], report["problems"]
    return report["rows"]


def one_error_line(err: str, command: str) -> str:
    """The one error line the CLI printed (progress bars may share standard error)."""
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err[err.index(f"dpocache {command}: error:"):].split("\n", 1)[0]


def test_score_onto_a_full_disk_then_rerun(disk, tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", conversational_rows(24, seed=5))
    args = ["score", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--rows_per_shard", "4"]
    assert main([*args, "--store", str(tmp_path / "reference")]) == 0
    capsys.readouterr()
    store = disk.path / "store"
    disk.fill(7 * PAGE)  # room for the manifest and a few shards of about 4.4 kB, not for all six
    assert main([*args, "--store", str(store)]) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert f"{store}/" in line and "no space left on device" in line and "needed" in line, line
    rows = assert_consistent(store)
    assert 0 < rows < 24
    disk.free()
    assert main([*args, "--store", str(store)]) == 0
    assert f"{24 - rows} scored, {rows} reused" in capsys.readouterr().out
    assert assert_consistent(store) == 24
    assert sorted_rows(store) == sorted_rows(tmp_path / "reference")
    assert ReferenceStore.open(store).get_list("prefs") == ReferenceStore.open(tmp_path / "reference").get_list("prefs")


def test_a_shard_or_list_that_does_not_fit_leaves_the_store_as_it_was(disk):
    root = disk.path / "s"
    rows = [make_row(i) for i in range(3)]
    store = write_rows(root, rows[:1])
    before = (root / "manifest.json").read_bytes()
    disk.fill(0)
    with pytest.raises(DiskFullError) as err:
        with store.writer() as w:
            w.add_many(rows[1:])
    text = str(err.value)
    assert f"{root}/shards/shard-" in text and "while writing a shard" in text and "needed" in text
    assert "\n" not in text
    with pytest.raises(DiskFullError, match=f"{root}/lists/mix"):
        store.record_list("mix", [r["hash"] for r in rows])
    assert (root / "manifest.json").read_bytes() == before
    assert assert_consistent(root) == 1
    disk.free()
    with store.writer() as w:
        w.add_many(rows[1:])
    store.record_list("mix", [r["hash"] for r in rows])
    assert assert_consistent(root) == 3 and sorted_rows(root) == sorted(rows, key=lambda r: r["hash"])


def test_a_manifest_that_does_not_fit_takes_its_renamed_shard_back(disk, tmp_path):
    """The shard fits, the manifest naming it does not: the shard is removed again, the manifest is untouched."""
    rows = [make_row(i) for i in range(4)]
    scratch = write_rows(tmp_path / "scratch", rows[1:], per_shard=10)  # the same shard, to learn its size
    shard_bytes = scratch.shards[0]["bytes"]
    root = disk.path / "s"
    store = write_rows(root, rows[:1])
    before = (root / "manifest.json").read_bytes()
    disk.fill(-(-shard_bytes // PAGE) * PAGE if disk.tmpfs else shard_bytes)
    with pytest.raises(DiskFullError, match=f"{root / 'manifest.json'}: no space left on device"):
        with store.writer(rows_per_shard=10) as w:
            w.add_many(rows[1:])
    assert (root / "manifest.json").read_bytes() == before
    assert assert_consistent(root) == 1 and len(store_files(root / "shards")) == 1
    disk.free()
    with store.writer() as w:
        w.add_many(rows[1:])
    assert assert_consistent(root) == 4


def test_merge_onto_a_full_disk_then_rerun(disk, tmp_path, capsys):
    rows = [make_row(i, token_logps=True) for i in range(40)]
    for k in range(2):
        write_rows(tmp_path / f"part{k}", rows[k::2], per_shard=5).record_list("mix", [r["hash"] for r in rows])
    dst = disk.path / "merged"
    sources = [str(tmp_path / "part0"), str(tmp_path / "part1")]
    disk.fill(8 * PAGE)
    assert main(["store", "merge", str(dst), *sources]) == 2
    line = one_error_line(capsys.readouterr().err, "store")
    assert f"{dst}/" in line and "no space left on device" in line and "needed" in line, line
    assert 0 < assert_consistent(dst) < 40
    disk.free()
    assert main(["store", "merge", str(dst), *sources]) == 0
    assert assert_consistent(dst) == 40
    assert sorted_rows(dst, list(rows[0])) == sorted(rows, key=lambda r: r["hash"])
    assert ReferenceStore.open(dst).get_list("mix") == [row_hash(i) for i in range(40)]


def test_a_full_home_costs_the_hash_cache_only(disk, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 10_000)
    monkeypatch.setenv("DPOCACHE_HOME", str(disk.path / "home"))
    disk.fill(0)
    digest = weights_fingerprint(weights)
    disk.free()
    assert digest == weights_fingerprint(weights)  # the digest does not depend on the cache
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: weights-hash cache not saved"), lines
    assert f"{disk.path / 'home' / 'hash-cache.json'}: no space left on device" in lines[0]

"""Named example lists: the ordered example hashes of one dataset or mixture, stored as JSON files."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from dpocache.artifacts.manifest import StoreError, safe_relpath
from dpocache.artifacts.shards import HASH_RE
from dpocache.files import atomic_write_bytes, file_sha256

LIST_DIR = "lists"
LIST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")


def check_list_name(name: object) -> str:
    """A list name is also a file name: letters, digits and ``. _ + = -``, not starting with a dot."""
    if not isinstance(name, str) or not LIST_NAME_RE.match(name):
        raise StoreError(f"example list name {name!r} is not allowed: use letters, digits and . _ + = - "
                         "(starting with a letter or digit, at most 200 characters)")
    return name


def check_hashes(hashes: list, where: str) -> list[str]:
    hashes = list(hashes)
    for i, h in enumerate(hashes):
        if not isinstance(h, str) or not HASH_RE.match(h):
            raise StoreError(f"{where}: entry {i} ({h!r}) is not an example hash (64 lowercase hex characters)")
    return hashes


def write_list_file(root: Path, name: str, hashes: list[str]) -> dict:
    """Write a new, uniquely named list file (caller holds the store lock); return its manifest entry."""
    rel = f"{LIST_DIR}/{name}.{uuid.uuid4().hex[:12]}.json"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(hashes).encode("ascii"))
    return {"path": rel, "count": len(hashes), "sha256": file_sha256(path)}


def read_list_file(root: Path, name: str, entry: dict, *, verify: bool) -> list[str]:
    """Load and check one list file named by the manifest."""
    path = safe_relpath(root, entry["path"], what="list")
    if not path.is_file():
        raise StoreError(f"{path}: example list {name!r} is missing")
    data = path.read_bytes()
    if verify and file_sha256(path) != entry["sha256"]:
        raise StoreError(f"{path}: example list {name!r} checksum mismatch (sha256 differs from the manifest): "
                         "corrupt")
    try:
        hashes = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: example list {name!r} is not valid JSON ({exc})") from None
    if not isinstance(hashes, list):
        raise StoreError(f"{path}: example list {name!r} must be a JSON array of hashes")
    hashes = check_hashes(hashes, str(path))
    if len(hashes) != entry["count"]:
        raise StoreError(f"{path}: example list {name!r} has {len(hashes)} entries, manifest says {entry['count']}")
    return hashes

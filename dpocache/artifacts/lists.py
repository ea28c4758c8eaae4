"""Named example lists: the ordered example hashes of one dataset or mixture, stored as JSON files.

A list's manifest entry holds ``path``, ``count`` and ``sha256``, and (stores written since lists have
them) ``role`` (``train``, or ``heldout`` for data kept for evaluation) and ``mixture_sha256`` (the digest
of the mixture specification it was recorded from). An entry without a role is a training list.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

from dpocache.artifacts.manifest import StoreError, safe_relpath
from dpocache.artifacts.shards import HASH_RE
from dpocache.files import atomic_write_bytes, disk_errors, file_sha256

LIST_DIR = "lists"
LIST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")
ROLE_TRAIN = "train"
ROLE_HELDOUT = "heldout"
ROLES = (ROLE_TRAIN, ROLE_HELDOUT)
_ROLE_WORDS = {ROLE_TRAIN: "training", ROLE_HELDOUT: "held-out"}


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


def check_role(role: object) -> str:
    if role not in ROLES:
        raise StoreError(f"example list role {role!r} is not one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def list_role(entry: dict) -> str:
    """The role of a list's manifest entry (entries of older stores have none: training lists)."""
    return entry.get("role") or ROLE_TRAIN


def free_list_name(lists: dict[str, dict], name: str, mixture_sha256: str) -> str:
    """A name derived from the data (not chosen by the user) that stays stable and unique: ``name`` when it is
    free or already holds a list of this mixture, else ``name-<first 8 digest digits>`` (12, 16, 64 if taken)."""
    for cand in [name] + [f"{name[:199 - k]}-{mixture_sha256[:k]}" for k in (8, 12, 16, 64)]:
        entry = lists.get(cand)
        if entry is None or entry.get("mixture_sha256") == mixture_sha256:
            return cand
    raise StoreError(f"no free example list name for {name!r}: pass --store_dataset NAME")


def role_word(role: str) -> str:
    """``training`` or ``held-out``."""
    return _ROLE_WORDS.get(role, role)


def describe_lists(lists: dict[str, dict]) -> str:
    """``name (N examples, training|held-out)``, ... for messages; 'none' when there is none."""
    parts = [f"{name} ({entry['count']} examples, {role_word(list_role(entry))})"
             for name, entry in sorted(lists.items())]
    return ", ".join(parts) or "none"


def write_list_file(root: Path, name: str, hashes: list[str]) -> dict:
    """Write a new, uniquely named list file (caller holds the store lock); return its manifest entry."""
    rel = f"{LIST_DIR}/{name}.{uuid.uuid4().hex[:12]}.json"
    path = root / rel
    data = json.dumps(hashes).encode("ascii")
    with disk_errors(path, needed=len(data), what="creating the list directory"):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return {"path": rel, "count": len(hashes), "sha256": hashlib.sha256(data).hexdigest()}


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

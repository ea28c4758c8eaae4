"""The reference store: content-addressed Parquet shards plus a manifest (see docs/store.md)."""

from dpocache.artifacts.inspect import format_inspect, inspect_store
from dpocache.artifacts.manifest import STORE_FORMAT_VERSION, IdentityMismatchError, StoreError
from dpocache.artifacts.merge import merge_stores
from dpocache.artifacts.store import ReferenceStore, ShardWriter

__all__ = ["STORE_FORMAT_VERSION", "IdentityMismatchError", "ReferenceStore", "ShardWriter", "StoreError",
           "format_inspect", "inspect_store", "merge_stores"]

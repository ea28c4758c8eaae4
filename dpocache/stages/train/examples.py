"""Where stage two's examples come from: a store's example list (streamed through its index), or, for a
reference-free loss, the tokenized data itself; the policy's tokenizer set up as stage one set it up.

Contract: :func:`load_training_data` returns a :class:`TrainingData` whose ``source`` is an
:class:`~dpocache.stages.train.source.ExampleSource` (index in memory, tokens read on demand);
:func:`heldout_source` does the same for a held-out list. Nothing here holds token data in Python lists.
"""

from __future__ import annotations

import json

from dataclasses import dataclass

import numpy as np

from dpocache.artifacts import ReferenceStore
from dpocache.artifacts.identity import text_fingerprint, tokenizer_fingerprint
from dpocache.config import ConfigError
from dpocache.console import log
from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer
from dpocache.losses import REFERENCE_FREE, LossConfig
from dpocache.modeling import ModelConfig, load_tokenizer
from dpocache.stages.train.source import DatasetSource, ExampleSource, StoreSource
from dpocache.stages.train.store_index import list_index


def _tokens_only():
    from dpocache.losses import Requirements

    return Requirements(reference=True, reference_tokens=True, policy_tokens=True, policy_log_sum_sq=False,
                        router_aux_loss=False)


@dataclass
class TrainingData:
    """The examples stage two trains on and what identifies them."""

    source: ExampleSource
    list_name: str
    store: ReferenceStore | None  # None: a reference-free loss trained from the data
    tokenizer: object
    missing: int = 0  # listed examples absent from the store (dropped with --allow_missing)

    @property
    def fingerprint(self) -> str:
        """What a resumed run must train on: the store's reference identity, or (no store) the example list."""
        if self.store is not None:
            return text_fingerprint(json.dumps(self.store.identity, sort_keys=True))
        return text_fingerprint("examples:" + "\n".join(h.decode() for h in self.source.hashes))


def store_source(store: ReferenceStore, name: str, *, allow_missing: bool, verify: bool,
                 reference_tokens: bool = False) -> StoreSource:
    """A store list as a streaming source; ``reference_tokens``: also read per-token reference log-probs (a loss
    needs them: refused before any compute when some example of the list lacks them)."""
    from dpocache.losses import check_requirements

    index = list_index(store, name, allow_missing=allow_missing, verify=verify)
    if reference_tokens:
        check_requirements(_tokens_only(), store=str(store.root), store_token_logps=index.token_logps)
    if index.missing:
        log(f"stage two: {index.missing} listed examples of '{name}' are missing from the store and were dropped")
    if len(index) == 0:
        raise ConfigError(f"example list '{name}' of {store.root} is empty")
    return StoreSource(store.root, index, description=f"list '{name}' of {store.root}",
                       reference_tokens=reference_tokens)


def data_source(data_cfg: DataConfig, tokenizer, *, progress: bool = True) -> tuple[str, DatasetSource]:
    """(list name, source without reference values) of ``data_cfg``, tokenized by the data layer.

    ``tokenizer`` must have been through :func:`dpocache.data.prepare_tokenizer`.
    """
    prepared = load_preference_data(data_cfg, tokenizer, progress=progress)
    return prepared.name, DatasetSource(prepared.dataset, prepared.hashes, description=f"the data '{prepared.name}'")


def data_tokenizer(model_cfg: ModelConfig, data_cfg: DataConfig):
    """The policy's tokenizer (or --tokenizer_name_or_path) prepared as the data layer prepares it."""
    tok = load_tokenizer(data_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path,
                         revision=model_cfg.model_revision, trust_remote_code=model_cfg.trust_remote_code)
    tok, _ = prepare_tokenizer(tok, data_cfg)
    return tok


def load_training_data(model_cfg: ModelConfig, cfg, data_cfg: DataConfig | None = None,
                       loss_cfg: LossConfig | None = None) -> TrainingData:
    """Where stage two's examples come from (see the module docstring).

    With ``--store``: the store's example list, and the policy's tokenizer set up as stage one set it
    up. Without a store, a reference-free loss (simpo) tokenizes ``--dataset``/``--mixer_list`` itself;
    any other loss needs the reference values of a store.
    """
    loss_cfg = loss_cfg or LossConfig()
    if cfg.store is None:
        if not loss_cfg.reference_free:
            raise ConfigError(f"loss_type {loss_cfg.loss_type} compares the policy with the reference: pass --store (a "
                              "store written by `dpocache score`); only reference-free losses "
                              f"({', '.join(sorted(REFERENCE_FREE))}) can train from --dataset without a store")
        if data_cfg is None or not data_cfg.mixture():
            raise ConfigError(f"train needs --store, or (the {loss_cfg.loss_type} loss is reference-free) the data "
                              "itself: --dataset or --mixer_list")
        tokenizer = data_tokenizer(model_cfg, data_cfg)
        name, source = data_source(data_cfg, tokenizer)
        log(f"stage two: {loss_cfg.loss_type} is reference-free: {len(source)} examples tokenized from the data "
            "(no store)")
        return TrainingData(source, cfg.store_dataset or name, None, tokenizer)
    if data_cfg is not None and data_cfg.mixture():
        log(f"stage two: examples come from the store {cfg.store}; --dataset/--mixer_list are not used")
    store = ReferenceStore.open(cfg.store, verify=cfg.verify_store)
    name = pick_list(store, cfg.store_dataset)
    source = store_source(store, name, allow_missing=cfg.allow_missing, verify=cfg.verify_store,
                          reference_tokens=loss_cfg.requirements.reference_tokens)
    return TrainingData(source, name, store, policy_tokenizer(model_cfg, store), source.index.missing)


def heldout_overlap(train: ExampleSource, heldout: ExampleSource) -> int:
    """How many distinct held-out pairs are also training pairs."""
    return int(np.intersect1d(np.unique(train.hashes), np.unique(heldout.hashes)).size)


def pick_list(store: ReferenceStore, name: str | None) -> str:
    """``--store_dataset``, or the store's one training list (held-out lists are never picked by default)."""
    lists, roles = store.lists(), store.list_roles()
    if name is not None:
        if name not in lists:
            raise ConfigError(f"store {store.root} has no example list '{name}'; it has: {store.describe_lists()}")
        return name
    train = [n for n in sorted(lists) if roles[n] != "heldout"]
    if len(train) != 1:
        raise ConfigError(f"store {store.root} holds {len(train)} training example lists ({store.describe_lists()}): "
                          "pick one with --store_dataset")
    return train[0]


def policy_tokenizer(model_cfg: ModelConfig, store: ReferenceStore):
    """The policy's tokenizer set up as stage one set it up; refused when it differs from the store's."""
    tok = load_tokenizer(model_cfg.model_name_or_path, revision=model_cfg.model_revision,
                         trust_remote_code=model_cfg.trust_remote_code)
    info = store.versions
    if info.get("chat_template") is not None:
        tok.chat_template = info["chat_template"]
    pad = info.get("pad_token")
    if pad is not None and tok.pad_token != pad:
        tok.add_special_tokens({"pad_token": pad})
    found, expected = tokenizer_fingerprint(tok), store.identity.get("tokenizer_sha256")
    if expected is not None and found != expected:
        raise ConfigError(f"the policy's tokenizer ({model_cfg.model_name_or_path}) differs from the one the "
                          f"store {store.root} was scored with (tokenizer_sha256 {found[:12]} != {expected[:12]}); "
                          "score the data with this tokenizer first")
    return tok

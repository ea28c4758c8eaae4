"""Examples in training form: loading them from a store (or, for reference-free losses, tokenizing
the data directly), batching them through the policy, and measuring a policy on them (reward accuracy
and margin against the stored reference; preference accuracy and log-prob margin without one)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from dpocache.artifacts import ReferenceStore, StoreError
from dpocache.artifacts.identity import text_fingerprint, tokenizer_fingerprint
from dpocache.config import ConfigError
from dpocache.console import log
from dpocache.data import DataConfig, load_preference_data, prepare_tokenizer
from dpocache.logprobs import pad_batch
from dpocache.losses import REFERENCE_FREE, SequenceLogps
from dpocache.modeling import ModelConfig, load_tokenizer
from dpocache.stages.train.packing import pack_batch, sequence_sums

EXAMPLE_COLUMNS = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask",
                   "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens"]



@dataclass
class Examples:
    """Examples in training form (host memory, only the columns training needs), in training-list order."""

    chosen_ids: list
    chosen_mask: list
    rejected_ids: list
    rejected_mask: list
    reference: np.ndarray | None  # [N, 4]: ref chosen sum, ref rejected sum, chosen count, rejected count;
    #                               None: tokenized from the data for a reference-free loss (no store)
    missing: int = 0
    hashes: list = field(default_factory=list)  # example hash of each row

    def __len__(self) -> int:
        return len(self.chosen_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Padded width each pair needs in a concatenated forward."""
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen_ids, self.rejected_ids)])


def load_examples(store: ReferenceStore, hashes: list[str], *, allow_missing: bool) -> Examples:
    table, missing = store.read_rows(hashes, EXAMPLE_COLUMNS, allow_missing=allow_missing)
    ref = np.stack([table[c].to_numpy().astype(np.float64) for c in
                    ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens")], 1)
    bad = ~np.isfinite(ref).all(axis=1) | (ref[:, :2] > 1e-3).any(axis=1)
    if bad.any():  # rows are validated when written; this guards stores read with --verify_store false
        first = table["hash"][int(np.argmax(bad))].as_py()
        raise StoreError(f"{store.root}: {int(bad.sum())} row(s) hold reference values that are not finite "
                         f"log-probability sums (first: {first}); the store is damaged: re-score them")
    return Examples(table["chosen_input_ids"].to_pylist(), table["chosen_mask"].to_pylist(),
                    table["rejected_input_ids"].to_pylist(), table["rejected_mask"].to_pylist(), ref, missing,
                    table["hash"].to_pylist())


def examples_from_data(data_cfg: DataConfig, tokenizer, *, progress: bool = True) -> tuple[str, Examples]:
    """(list name, Examples without reference values) of ``data_cfg``, tokenized by the data layer.

    ``tokenizer`` must have been through :func:`dpocache.data.prepare_tokenizer`.
    """
    prepared = load_preference_data(data_cfg, tokenizer, progress=progress)
    sides = ["chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask"]
    columns = prepared.dataset.select_columns(["hash", *sides]).to_dict()
    position = {h: k for k, h in enumerate(columns["hash"])}
    order = [position[h] for h in prepared.hashes]
    c_ids, c_mask, r_ids, r_mask = ([columns[c][k] for k in order] for c in sides)
    return prepared.name, Examples(c_ids, c_mask, r_ids, r_mask, None, 0, list(prepared.hashes))


def data_tokenizer(model_cfg: ModelConfig, data_cfg: DataConfig):
    """The policy's tokenizer (or --tokenizer_name_or_path) prepared as the data layer prepares it."""
    tok = load_tokenizer(data_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path,
                         revision=model_cfg.model_revision, trust_remote_code=model_cfg.trust_remote_code)
    tok, _ = prepare_tokenizer(tok, data_cfg)
    return tok


def load_training_data(model_cfg: ModelConfig, cfg, data_cfg: DataConfig | None = None):
    """Where stage two's examples come from: ``(store or None, list name, Examples, tokenizer)``.

    With ``--store``: the store's example list, and the policy's tokenizer set up as stage one set it
    up. Without a store, a reference-free loss (simpo) tokenizes ``--dataset``/``--mixer_list`` itself;
    any other loss needs the reference values of a store.
    """
    if cfg.store is None:
        if cfg.loss_type not in REFERENCE_FREE:
            raise ConfigError(f"loss_type {cfg.loss_type} compares the policy with the reference: pass --store (a "
                              "store written by `dpocache score`); only reference-free losses "
                              f"({', '.join(sorted(REFERENCE_FREE))}) can train from --dataset without a store")
        if data_cfg is None or not data_cfg.mixture():
            raise ConfigError(f"train needs --store, or (the {cfg.loss_type} loss is reference-free) the data "
                              "itself: --dataset or --mixer_list")
        tokenizer = data_tokenizer(model_cfg, data_cfg)
        name, examples = examples_from_data(data_cfg, tokenizer)
        log(f"stage two: {cfg.loss_type} is reference-free: {len(examples)} examples tokenized from the data "
            "(no store)")
        return None, cfg.store_dataset or name, examples, tokenizer
    if data_cfg is not None and data_cfg.mixture():
        log(f"stage two: examples come from the store {cfg.store}; --dataset/--mixer_list are not used")
    store = ReferenceStore.open(cfg.store, verify=cfg.verify_store)
    name = pick_list(store, cfg.store_dataset)
    examples = load_examples(store, store.get_list(name), allow_missing=cfg.allow_missing)
    if examples.missing:
        log(f"stage two: {examples.missing} listed examples are missing from the store and were dropped")
    if len(examples) == 0:
        raise ConfigError(f"example list '{name}' of {store.root} is empty")
    return store, name, examples, policy_tokenizer(model_cfg, store)


def data_fingerprint(store: ReferenceStore | None, examples: Examples) -> str:
    """What a resumed run must train on: the store's reference identity, or (no store) the example list."""
    if store is not None:
        return text_fingerprint(json.dumps(store.identity, sort_keys=True))
    return text_fingerprint("examples:" + "\n".join(examples.hashes))


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


def forward_batch(logp_model, ex: Examples, idx, pad_id: int, device, packing: bool = False):
    """Concatenated forward of chosen + rejected; returns policy and reference SequenceLogps, the number of
    non-pad tokens and the MoE aux loss (or None). With ``packing`` the 2B sequences run as one padding-free
    row (:mod:`dpocache.stages.train.packing`); the results are the same."""
    seqs = [ex.chosen_ids[i] for i in idx] + [ex.rejected_ids[i] for i in idx]
    masks = [ex.chosen_mask[i] for i in idx] + [ex.rejected_mask[i] for i in idx]
    if packing:
        packed = pack_batch(seqs, masks, device=device)
        per_token = logp_model(packed.input_ids, None, packed.mask, packed.position_ids)
    else:
        ids, attn, tmask = pad_batch(seqs, masks, pad_id, device=device)
        per_token = logp_model(ids, attn, tmask)
    aux = None
    if isinstance(per_token, tuple):
        per_token, aux = per_token
    if packing:
        (sums, counts), ntok = sequence_sums(per_token, packed), packed.num_tokens
    else:
        sums, counts, ntok = per_token.sum(-1), tmask.sum(-1), int(attn.sum())
    b = len(idx)
    policy = SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])
    reference = None
    if ex.reference is not None:  # None: a reference-free loss trained without a store
        ref = torch.as_tensor(ex.reference[np.asarray(idx)], dtype=torch.float32, device=device)
        reference = SequenceLogps(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3])
    return policy, reference, ntok, aux


@torch.no_grad()
def evaluate(logp_model, examples: Examples, pad_id: int, *, loss_type: str, beta: float,
             batch_size: int = 8, device="cpu") -> dict[str, float]:
    """The policy measured on ``examples``.

    Against the stored reference: ``reward_accuracy`` and ``reward_margin`` (beta-scaled log-ratio
    differences, as the loss sees them). For a reference-free loss (no reference to compare with):
    ``policy_preference_accuracy``, the fraction of pairs whose chosen side has the higher average
    log-prob per token, and ``policy_logp_margin``, the mean of avg chosen - avg rejected log-prob.
    """
    from dpocache.losses import AVERAGED

    free = loss_type in REFERENCE_FREE or examples.reference is None
    averaged = free or loss_type in AVERAGED
    was_training = logp_model.training
    logp_model.eval()
    correct, margins = [], []
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        policy, reference, _, _ = forward_batch(logp_model, examples, idx, pad_id, device)
        pc, pr = policy.pick(averaged)
        if free:
            margin = pc - pr
        else:
            rc, rr = reference.pick(averaged)
            margin = beta * ((pc - rc) - (pr - rr))
        margins.append(margin)
        correct.append((margin > 0).float())
    logp_model.train(was_training)
    accuracy, mean_margin = torch.cat(correct).mean().item(), torch.cat(margins).mean().item()
    if free:
        return {"policy_preference_accuracy": accuracy, "policy_logp_margin": mean_margin}
    return {"reward_accuracy": accuracy, "reward_margin": mean_margin}

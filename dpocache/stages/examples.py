"""Stored examples in training form: loading them from a store, batching them through the policy,
and measuring a policy against the stored reference (reward accuracy and margin)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpocache.artifacts import ReferenceStore
from dpocache.artifacts.identity import tokenizer_fingerprint
from dpocache.config import ConfigError
from dpocache.logprobs import pad_batch
from dpocache.losses import SequenceLogps
from dpocache.modeling import ModelConfig, load_tokenizer

EXAMPLE_COLUMNS = ["hash", "chosen_input_ids", "chosen_mask", "rejected_input_ids", "rejected_mask",
                   "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tokens", "ref_rejected_tokens"]



@dataclass
class Examples:
    """Stored examples in training form (host memory, only the columns training needs)."""

    chosen_ids: list
    chosen_mask: list
    rejected_ids: list
    rejected_mask: list
    reference: np.ndarray  # [N, 4]: ref chosen sum, ref rejected sum, chosen count, rejected count
    missing: int = 0

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
    return Examples(table["chosen_input_ids"].to_pylist(), table["chosen_mask"].to_pylist(),
                    table["rejected_input_ids"].to_pylist(), table["rejected_mask"].to_pylist(), ref, missing)


def pick_list(store: ReferenceStore, name: str | None) -> str:
    lists = store.lists()
    if name is not None:
        if name not in lists:
            raise ConfigError(f"store {store.root} has no example list '{name}'; it has: "
                              f"{', '.join(sorted(lists)) or 'none'}")
        return name
    if len(lists) != 1:
        raise ConfigError(f"store {store.root} holds {len(lists)} example lists "
                          f"({', '.join(sorted(lists)) or 'none'}): pick one with --store_dataset")
    return next(iter(lists))


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


def forward_batch(logp_model, ex: Examples, idx, pad_id: int, device):
    """Concatenated forward of chosen + rejected; returns policy and reference SequenceLogps."""
    seqs = [ex.chosen_ids[i] for i in idx] + [ex.rejected_ids[i] for i in idx]
    masks = [ex.chosen_mask[i] for i in idx] + [ex.rejected_mask[i] for i in idx]
    ids, attn, tmask = pad_batch(seqs, masks, pad_id, device=device)
    per_token = logp_model(ids, attn, tmask)
    aux = None
    if isinstance(per_token, tuple):
        per_token, aux = per_token
    sums, counts = per_token.sum(-1), tmask.sum(-1)
    b = len(idx)
    policy = SequenceLogps(sums[:b], sums[b:], counts[:b], counts[b:])
    ref = torch.as_tensor(ex.reference[np.asarray(idx)], dtype=torch.float32, device=device)
    reference = SequenceLogps(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3])
    return policy, reference, int(attn.sum()), aux


@torch.no_grad()
def evaluate(logp_model, examples: Examples, pad_id: int, *, loss_type: str, beta: float,
             batch_size: int = 8, device="cpu") -> dict[str, float]:
    """Reward accuracy and margin of the policy against the stored reference on ``examples``."""
    from dpocache.losses import AVERAGED

    averaged = loss_type in AVERAGED
    was_training = logp_model.training
    logp_model.eval()
    correct, margins = [], []
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        policy, reference, _, _ = forward_batch(logp_model, examples, idx, pad_id, device)
        pc, pr = policy.pick(averaged)
        rc, rr = reference.pick(averaged)
        margin = beta * ((pc - rc) - (pr - rr))
        margins.append(margin)
        correct.append((margin > 0).float())
    logp_model.train(was_training)
    return {"reward_accuracy": torch.cat(correct).mean().item(), "reward_margin": torch.cat(margins).mean().item()}

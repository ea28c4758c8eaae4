"""Selected-position log-probs equal a direct HF forward (labels with -100, fp32 log_softmax)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpocache.logprobs import TokenLogps, pad_batch, supports_selected_path


def direct_sums(model, seqs, masks):
    """open-instruct's recipe: labels = ids with non-trainable set to -100, logits[:, :-1] vs labels[:, 1:]."""
    sums, counts = [], []
    for ids, mask in zip(seqs, masks):
        x = torch.tensor([ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)]])
        with torch.no_grad():
            logits = model(input_ids=x).logits[:, :-1].float()
        lab = labels[:, 1:]
        valid = lab != -100
        logp = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1)
        sums.append((logp * valid).sum().item())
        counts.append(int(valid.sum()))
    return sums, counts


@pytest.mark.parametrize("chunk", [3, 1024])
def test_selected_path_matches_direct_forward(tiny_model_dir, chunk):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert supports_selected_path(model)
    g = torch.Generator().manual_seed(0)
    seqs, masks = [], []
    for n in (5, 17, 9, 30):
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        seqs.append(ids)
        masks.append(mask)
    ids, attn, tmask = pad_batch(seqs, masks, pad_id=0)
    with torch.no_grad():
        per_token = TokenLogps(model, chunk=chunk)(ids, attn, tmask)
    sums, counts = direct_sums(model, seqs, masks)
    assert per_token.double().sum(-1).tolist() == pytest.approx(sums, rel=1e-6, abs=1e-5)
    assert tmask.sum(-1).tolist() == counts
    assert (per_token[tmask == 0] == 0).all()


@pytest.mark.parametrize("keep_mb", [0.0, 0.4, 100.0])  # every chunk recomputed / the first kept / all kept
def test_selected_path_gradients_match_full_path(tiny_model_dir, keep_mb):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    masks = [[0, 0, 1, 1, 1, 1, 0], [0, 1, 1]]
    ids, attn, tmask = pad_batch(seqs, masks, pad_id=0)
    grads = []
    for selected in (True, False):
        model.zero_grad()
        TokenLogps(model, selected=selected, chunk=2, keep_mb=keep_mb)(ids, attn, tmask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)

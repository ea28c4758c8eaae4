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


def _big_logit_models():
    """Tiny Gemma 2 (soft-capping), Cohere (logit_scale) and Granite (logits_scaling) models whose output head
    is scaled up so that their logit transforms matter (raw logits of tens of nats)."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    small = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    models = {"gemma2": Gemma2ForCausalLM(Gemma2Config(**small, head_dim=16, final_logit_softcapping=5.0)),
              "cohere": CohereForCausalLM(CohereConfig(**small, logit_scale=0.25)),
              "granite": GraniteForCausalLM(GraniteConfig(**small, logits_scaling=8.0))}
    for model in models.values():
        with torch.no_grad():
            model.lm_head.weight.mul_(400.0)
        model.eval()
    return models


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_logit_transforms_are_applied_on_the_selected_path(name):
    from dpocache.logprobs import full_token_logps, selected_token_logps

    model = _big_logit_models()[name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 12), generator=g)
    attn, mask = torch.ones_like(ids), torch.ones_like(ids)
    mask[:, :4] = 0
    with torch.no_grad():
        full = full_token_logps(model, ids, attn, mask)
        fast = selected_token_logps(model, ids, attn, mask)
        raw = model.lm_head(model.get_decoder()(input_ids=ids).last_hidden_state)
    assert raw.abs().max() > 20  # the transform changes the log-probs a lot here
    assert supports_selected_path(model)
    assert torch.allclose(fast, full, atol=1e-4, rtol=1e-4)
    model.train()  # gradients through the transform equal the full path's
    grads = []
    for selected in (True, False):
        model.zero_grad()
        TokenLogps(model, selected=selected, chunk=5)(ids, attn, mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-3, rtol=1e-3)

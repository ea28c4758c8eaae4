"""Loss options that read per-token values, or reshape the log-ratio, against the formulas written out here:
LD-DPO's down-weighted tail (``--ld_alpha``), the f-divergence scores (``--f_divergence_type``) and WPO's
per-pair weights (``--use_weighting``); values, gradients and a float64 gradcheck. The per-loss formulas
come from ``test_losses.py``."""

import math

import pytest
import torch

from test_losses import assert_grads_match, formula, hyper, inputs_of, logsig, make_batch

from dpocache.losses import LOSSES, LossConfig, LossInputs, PairTokens, SequenceLogps, build_loss


def token_batch(seed=0, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t - 1, (2, b), generator=g)
    masks = [(torch.arange(t)[None] >= 1) & (torch.arange(t)[None] <= lengths[i][:, None]) for i in range(2)]
    pol = [(-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_() for _ in range(2)]
    ref = [-torch.rand(b, t, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    return pol, ref, masks


def _ld_sum(values, mask, shared, alpha):
    out = []
    for row, m, k in zip(values, mask, shared):
        picked = row[m]
        out.append(picked[:k].sum() + alpha * picked[k:].sum())
    return torch.stack(out)


@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "ipo", "bco_pair"])
def test_ld_alpha_desensitises_policy_and_reference(name):
    alpha, beta = 0.3, 0.5
    pol, ref, masks = token_batch(11)
    counts = [m.sum(-1) for m in masks]
    shared = torch.minimum(*counts)
    b = dict(pc=_ld_sum(pol[0], masks[0], shared, alpha), pr=_ld_sum(pol[1], masks[1], shared, alpha),
             rc=_ld_sum(ref[0], masks[0], shared, alpha), rr=_ld_sum(ref[1], masks[1], shared, alpha),
             nc=counts[0].double(), nr=counts[1].double())
    plain = [torch.where(m, v, 0).sum(-1) for v, m in zip(pol, masks)]
    inputs = LossInputs(SequenceLogps(plain[0], plain[1], counts[0], counts[1]),
                        SequenceLogps(*(torch.where(m, v, 0).sum(-1) for v, m in zip(ref, masks)), *counts),
                        policy_tokens=PairTokens(pol[0], pol[1], masks[0], masks[1]),
                        reference_tokens=PairTokens(ref[0], ref[1], masks[0], masks[1]))
    loss = build_loss(LossConfig(loss_type=name, beta=beta, ld_alpha=alpha))
    assert loss.requirements.reference_tokens and loss.requirements.policy_tokens
    out = loss(inputs)
    expected = formula(name)(b, hyper(name, beta=beta))
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    assert_grads_match(out.loss, expected.mean(), pol)
    with pytest.raises(ValueError, match="reference_tokens is missing"):
        loss(LossInputs(inputs.policy, inputs.reference, policy_tokens=inputs.policy_tokens))


def test_ld_alpha_gradcheck():
    pol, ref, masks = token_batch(12, b=3, t=8)
    counts = [m.sum(-1) for m in masks]
    loss = build_loss(LossConfig(loss_type="dpo", beta=0.5, ld_alpha=0.4))
    ref_seq = SequenceLogps(*(torch.where(m, v, 0).sum(-1) for v, m in zip(ref, masks)), *counts)

    def fn(c, r):
        sums = [torch.where(m, v, 0).sum(-1) for v, m in zip((c, r), masks)]
        return loss(LossInputs(SequenceLogps(*sums, *counts), ref_seq, PairTokens(c, r, *masks),
                               PairTokens(ref[0], ref[1], *masks))).loss

    assert torch.autograd.gradcheck(fn, tuple(pol), eps=1e-6, atol=1e-6)


def _f_score(u, kind, alpha=0.5):
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) - torch.log1p(torch.exp(-u))
    return (torch.exp((alpha - 1) * u) - 1) / (alpha - 1)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", ["dpo", "dpo_norm", "ipo", "hinge"])
def test_f_divergence_scores(kind, name):
    beta, b = 0.6, make_batch(13)
    sc, sr = _f_score(b["pc"] - b["rc"], kind, 0.3), _f_score(b["pr"] - b["rr"], kind, 0.3)
    if LOSSES[name].averaged:
        sc, sr = sc / b["nc"], sr / b["nr"]
    d = sc - sr
    expected = {"dpo": -logsig(beta * d), "dpo_norm": -logsig(beta * d), "ipo": (d - 1 / (2 * beta)) ** 2,
                "hinge": torch.relu(1 - beta * d)}[name]
    cfg = LossConfig(loss_type=name, beta=beta, f_divergence_type=kind, f_alpha_divergence_coef=0.3)
    out = build_loss(cfg)(inputs_of(b))
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    assert_grads_match(out.loss, expected.mean(), [b["pc"], b["pr"]])


def test_forward_kl_with_very_negative_log_ratios_stays_finite_in_fp32():
    pc = torch.tensor([-20000.0, -3.0], requires_grad=True)
    pr = torch.tensor([-3.0, -3.0], requires_grad=True)
    n = torch.tensor([10, 10])
    ref = torch.tensor([-3.0, -3.0])
    out = build_loss(LossConfig(loss_type="dpo", f_divergence_type="forward_kl"))(
        LossInputs(SequenceLogps(pc, pr, n, n), SequenceLogps(ref, ref, n, n)))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("name", ["dpo", "ipo", "hinge", "bco_pair", "sft"])
def test_use_weighting_multiplies_by_the_wpo_weights(name):
    beta = 0.5
    pol, _, masks = token_batch(14)
    g = torch.Generator().manual_seed(3)
    sq = [-torch.rand(pol[0].shape, generator=g, dtype=torch.float64) for _ in range(2)]
    b = make_batch(14, b=pol[0].shape[0])
    b["nc"], b["nr"] = masks[0].sum(-1).double(), masks[1].sum(-1).double()
    b["pc"] = torch.where(masks[0], pol[0], 0).sum(-1)
    b["pr"] = torch.where(masks[1], pol[1], 0).sum(-1)
    weights = [torch.exp(((torch.where(m, p, 0) - torch.where(m, s, 0)).sum(-1) / m.sum(-1))).detach()
               for p, s, m in zip(pol, sq, masks)]
    expected = formula(name)(b, hyper(name, beta=beta)) * weights[0] * weights[1]
    loss = build_loss(LossConfig(loss_type=name, beta=beta, use_weighting=True))
    assert loss.requirements.policy_log_sum_sq
    inputs = inputs_of(b)
    inputs.policy_log_sum_sq = PairTokens(sq[0], sq[1], masks[0], masks[1])
    out = loss(inputs)
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    assert_grads_match(out.loss, expected.mean(), pol)

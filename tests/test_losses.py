"""Every registered loss against an independent implementation of its published formula, written here from
the papers (plain torch arithmetic on [B] tensors, nothing from dpocache.losses): values and gradients on
random log-probs, equal log-probs, very large margins in fp32, gradcheck in float64, weighted combinations,
metric names, bco_pair's running reward mean and its exact resume (LD-DPO, f-divergences and WPO weights:
``test_loss_token_options.py``)."""

import math

import pytest
import torch

from dpocache.data.errors import DataError
from dpocache.losses import (
    LOSSES,
    LossConfig,
    LossInputs,
    PairTokens,
    SequenceLogps,
    all_names,
    build_loss,
)


def logsig(x):
    return -torch.nn.functional.softplus(-x)


def sig(x):
    return 1 / (1 + torch.exp(-x))


def smoothed(x, ls):
    return -(1 - ls) * logsig(x) - ls * logsig(-x)


# Independent formulas: b = dict(pc, pr, rc, rr: sums; nc, nr: counts); h = hyper-parameters.
def _d(b):
    return (b["pc"] - b["rc"]) - (b["pr"] - b["rr"])


def _d_avg(b):
    return (b["pc"] - b["rc"]) / b["nc"] - (b["pr"] - b["rr"]) / b["nr"]


def _nll(b):
    return -b["pc"].sum() / b["nc"].sum()


def _bco(b, h):
    uc, ur = b["pc"] - b["rc"], b["pr"] - b["rr"]
    shift = h["beta"] * torch.cat([uc, ur]).detach().mean() if h.get("shift", True) else 0.0
    return -logsig(h["beta"] * uc - shift) - logsig(-(h["beta"] * ur - shift))


def _kto(b, h):
    uc, ur = b["pc"] - b["rc"], b["pr"] - b["rr"]
    zc, zr = uc.mean().clamp(min=0).detach(), ur.mean().clamp(min=0).detach()
    return (1 - sig(h["beta"] * (uc - zr)) + 1 - sig(h["beta"] * (zc - ur))) / 2


def _aot(b, h, paired):
    if paired:
        x = torch.sort(b["pc"] - b["pr"])[0] - torch.sort(b["rc"] - b["rr"])[0]
    else:
        x = torch.sort(b["pc"] - b["rc"])[0] - torch.sort(b["pr"] - b["rr"])[0]
    return smoothed(h["beta"] * x, h["ls"])


def _orpo(b, h):
    ac, ar = b["pc"] / b["nc"], b["pr"] / b["nr"]
    log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
    return _nll(b) - h["beta"] * logsig(log_odds)


def _discopop(b, h):
    x = h["beta"] * _d(b)
    m = sig(x / h["tau"])
    return -logsig(x) * (1 - m) + torch.exp(-x) * m


FORMULAS = {
    "dpo": lambda b, h: smoothed(h["beta"] * _d(b), h["ls"]),
    "dpo_norm": lambda b, h: smoothed(h["beta"] * _d_avg(b), h["ls"]),
    "wpo": lambda b, h: smoothed(h["beta"] * _d(b), h["ls"])
    * torch.exp(b["pc"] / b["nc"] + b["pr"] / b["nr"]).clamp(max=1).detach(),
    "ipo": lambda b, h: (_d_avg(b) - 1 / (2 * h["beta"])) ** 2,
    "hinge": lambda b, h: torch.relu(1 - h["beta"] * _d(b)),
    "robust": lambda b, h: (-(1 - h["ls"]) * logsig(h["beta"] * _d(b)) + h["ls"] * logsig(-h["beta"] * _d(b)))
    / (1 - 2 * h["ls"]),
    "exo_pair": lambda b, h: sig(h["beta"] * _d(b)) * (logsig(h["beta"] * _d(b)) - math.log(1 - h["ls"]))
    + sig(-h["beta"] * _d(b)) * (logsig(-h["beta"] * _d(b)) - math.log(h["ls"])),
    "nca_pair": lambda b, h: -logsig(h["beta"] * (b["pc"] - b["rc"])) - 0.5 * logsig(-h["beta"] * (b["pc"] - b["rc"]))
    - 0.5 * logsig(-h["beta"] * (b["pr"] - b["rr"])),
    "bco_pair": _bco,
    "sppo_hard": lambda b, h: (b["pc"] - b["rc"] - 0.5 / h["beta"]) ** 2 + (b["pr"] - b["rr"] + 0.5 / h["beta"]) ** 2,
    "aot": lambda b, h: _aot(b, h, True),
    "aot_unpaired": lambda b, h: _aot(b, h, False),
    "apo_zero": lambda b, h: 1 - sig(h["beta"] * (b["pc"] - b["rc"])) + sig(h["beta"] * (b["pr"] - b["rr"])),
    "apo_down": lambda b, h: sig(h["beta"] * (b["pc"] - b["rc"])) + 1 - sig(h["beta"] * _d(b)),
    "discopop": _discopop,
    "kto_pair": _kto,
    "simpo": lambda b, h: smoothed(h["beta"] * (b["pc"] / b["nc"] - b["pr"] / b["nr"] - h["gamma"]), h["ls"]),
    "orpo": _orpo,
    "sft": lambda b, h: _nll(b).expand(b["pc"].shape[0]),
}
ALIASES = {"sigmoid": "dpo", "sigmoid_norm": "dpo_norm"}
NEEDS_SMOOTHING = {"exo_pair"}


def formula(name):
    return FORMULAS[ALIASES.get(name, name)]


def make_batch(seed=0, b=6, dtype=torch.float64, scale=1.0):
    """Random sums (policy near the reference) and counts; policy sums require grad."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 40, (b,), generator=g)
    nr = torch.randint(1, 40, (b,), generator=g)
    rc = -(torch.rand(b, generator=g, dtype=dtype) * 2 + 0.2) * nc
    rr = -(torch.rand(b, generator=g, dtype=dtype) * 2 + 0.2) * nr
    pc = (rc + torch.randn(b, generator=g, dtype=dtype) * scale).clamp(max=-0.05).requires_grad_()
    pr = (rr + torch.randn(b, generator=g, dtype=dtype) * scale).clamp(max=-0.05).detach().requires_grad_()
    return dict(pc=pc.detach().requires_grad_(), pr=pr, rc=rc, rr=rr, nc=nc.to(dtype), nr=nr.to(dtype))


def inputs_of(b, reference=True):
    policy = SequenceLogps(b["pc"], b["pr"], b["nc"].long(), b["nr"].long())
    ref = SequenceLogps(b["rc"], b["rr"], b["nc"].long(), b["nr"].long()) if reference else None
    return LossInputs(policy, ref)


def hyper(name, **kw):
    h = dict(beta=0.7, ls=0.1 if name in NEEDS_SMOOTHING else 0.0, gamma=0.4, tau=0.05)
    h.update(kw)
    return h


def loss_of(name, h, **extra):
    cfg = LossConfig(loss_type=name, beta=h["beta"], label_smoothing=h["ls"], gamma_beta_ratio=h["gamma"],
                     discopop_tau=h["tau"], **extra)
    return build_loss(cfg)


def assert_grads_match(got_loss, want_loss, tensors):
    """Same gradients w.r.t. ``tensors`` (a tensor neither loss reads, e.g. rejected for sft, is skipped)."""
    got = torch.autograd.grad(got_loss, tensors, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(want_loss, tensors, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_every_registered_loss_has_an_independent_formula():
    assert set(FORMULAS) == set(LOSSES)
    assert set(all_names()) == set(FORMULAS) | set(ALIASES)


@pytest.mark.parametrize("name", sorted(set(FORMULAS) | set(ALIASES)))
@pytest.mark.parametrize("seed,ls", [(0, 0.0), (1, 0.2)])
def test_value_and_gradient_match_the_published_formula(name, seed, ls):
    h = hyper(name, ls=max(ls, 0.1 if name in NEEDS_SMOOTHING else 0.0))
    b = make_batch(seed)
    out = loss_of(name, h)(inputs_of(b))
    expected = formula(name)(b, h)
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-10, atol=1e-12)
    assert_grads_match(out.loss, expected.mean(), [b["pc"], b["pr"]])


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_equal_log_probs(name):
    """Policy == reference and chosen == rejected: the formula's value (dpo: log 2), finite gradients."""
    h = hyper(name)
    v = torch.full((4,), -6.0, dtype=torch.float64)
    n = torch.full((4,), 3.0, dtype=torch.float64)
    b = dict(pc=v.clone().requires_grad_(), pr=v.clone().requires_grad_(), rc=v.clone(), rr=v.clone(), nc=n, nr=n)
    out = loss_of(name, h)(inputs_of(b))
    torch.testing.assert_close(out.losses, formula(name)(b, h), rtol=1e-12, atol=1e-12)
    if name == "dpo":
        assert out.loss.item() == pytest.approx(math.log(2))
    grads = torch.autograd.grad(out.loss, [b["pc"], b["pr"]], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_very_large_margins_stay_finite_in_fp32(name, sign):
    """Margins of 2e4 nats (beta * d = 2000) in fp32: no overflow, no NaN, in the loss or its gradient."""
    h = hyper(name, beta=0.1)
    f32 = dict(dtype=torch.float32)
    pc = torch.tensor([-5.0, -20005.0], **f32) if sign > 0 else torch.tensor([-20005.0, -5.0], **f32)
    pr = torch.tensor([-20005.0, -5.0], **f32) if sign > 0 else torch.tensor([-5.0, -20005.0], **f32)
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    n = torch.tensor([20000, 4], dtype=torch.long)
    ref = torch.tensor([-5000.0, -5000.0], **f32)
    inputs = LossInputs(SequenceLogps(pc, pr, n, n.flip(0)), SequenceLogps(ref, ref, n, n.flip(0)))
    out = loss_of(name, h)(inputs)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.loss)
    pc_grad, pr_grad = torch.autograd.grad(out.loss, [pc, pr], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in (pc_grad, pr_grad))
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_zero_length_responses_are_refused(name):
    b = make_batch(3, b=3)
    b["nr"] = torch.tensor([4.0, 0.0, 2.0], dtype=torch.float64)
    with pytest.raises(DataError, match=r"training batch, pair\(s\) 1: the rejected response has no trainable token"):
        loss_of(name, hyper(name))(inputs_of(b))


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_gradcheck_float64(name):
    """torch.autograd.gradcheck of the batch loss w.r.t. the policy sums. Terms the papers hold constant
    (detached) must be constant around the inputs for finite differences to agree: kto_pair's reference
    points are clamped at 0 here (policy below the reference on average), wpo's weight at 1 (its weights are
    checked against the formula above), bco_pair's shift is frozen (eval mode)."""
    h = hyper(name)
    b = make_batch(5, b=5)
    if name == "kto_pair":
        b["rc"], b["rr"] = b["rc"] + 2.0, b["rr"] + 2.0
    if name == "wpo":
        b["pc"] = (b["pc"].detach() * 0 + 0.3).requires_grad_()
        b["pr"] = (b["pr"].detach() * 0 + 0.2).requires_grad_()
    loss = loss_of(name, h).eval()
    ref = None if not LOSSES[name].reference else SequenceLogps(b["rc"], b["rr"], b["nc"].long(), b["nr"].long())

    def fn(pc, pr):
        return loss(LossInputs(SequenceLogps(pc, pr, b["nc"].long(), b["nr"].long()), ref)).loss

    assert torch.autograd.gradcheck(fn, (b["pc"], b["pr"]), eps=1e-6, atol=1e-6)


def test_mpo_weighted_combination_and_metric_names():
    h = hyper("dpo", beta=0.3)
    b = make_batch(7)
    cfg = LossConfig(loss_type="sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0", beta=0.3)
    out = build_loss(cfg)(inputs_of(b))
    parts = {"sigmoid": formula("dpo")(b, h), "bco_pair": _bco(b, h), "sft": formula("sft")(b, h)}
    expected = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + 1.0 * parts["sft"]
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-10, atol=1e-12)
    for name, value in parts.items():
        torch.testing.assert_close(out.metrics[f"loss/{name}"], value.mean(), rtol=1e-10, atol=1e-12)
    shared = ["train_loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/average",
              "rewards/accuracy", "rewards/margin"]
    assert sorted(out.metrics) == sorted(shared + ["loss/sigmoid", "loss/bco_pair", "loss/sft"])
    assert_grads_match(out.loss, expected.mean(), [b["pc"], b["pr"]])


@pytest.mark.parametrize("name,averaged", [("dpo", False), ("dpo_norm", True), ("ipo", True), ("hinge", False)])
def test_shared_metrics_have_open_instructs_names_and_values(name, averaged):
    beta = 0.7
    b = make_batch(9)
    out = build_loss(LossConfig(loss_type=name, beta=beta))(inputs_of(b))
    pc, pr, rc, rr = (b[k] / b[n] if averaged else b[k] for k, n in (("pc", "nc"), ("pr", "nr"), ("rc", "nc"),
                                                                     ("rr", "nr")))
    chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    want = {"train_loss": out.losses.detach().mean(), "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(), "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(), "rewards/average": (chosen + rejected).mean() / 2,
            "rewards/accuracy": (chosen > rejected).double().mean(), "rewards/margin": (chosen - rejected).mean(),
            f"loss/{name}": out.losses.detach().mean()}
    assert sorted(out.metrics) == sorted(want)
    for key, value in want.items():
        metric = out.metrics[key]
        assert metric.dim() == 0 and not metric.requires_grad and metric.device == b["pc"].device
        torch.testing.assert_close(metric, value.to(metric.dtype), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["simpo", "orpo", "sft"])
def test_reference_free_losses_need_no_reference_and_log_no_rewards(name):
    b = make_batch(2)
    loss = loss_of(name, hyper(name))
    assert loss.reference_free and not loss.requirements.reference
    out = loss(inputs_of(b, reference=False))
    torch.testing.assert_close(out.losses, formula(name)(b, hyper(name)), rtol=1e-10, atol=1e-12)
    assert not any(k.startswith("rewards/") for k in out.metrics)


def test_missing_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="LossInputs.reference is missing"):
        build_loss(LossConfig(loss_type="dpo"))(inputs_of(make_batch(0), reference=False))


def test_sft_weight_adds_the_sft_loss():
    b = make_batch(4)
    base = build_loss(LossConfig(loss_type="dpo", beta=0.5))(inputs_of(b))
    with_sft = build_loss(LossConfig(loss_type="dpo", beta=0.5, sft_weight=0.25))(inputs_of(b))
    torch.testing.assert_close(with_sft.losses - base.losses, 0.25 * formula("sft")(b, {}).detach(),
                               rtol=1e-10, atol=1e-12)
    assert "loss/sft" in with_sft.metrics


def test_load_balancing_adds_the_weighted_router_loss():
    b = make_batch(4)
    aux = torch.tensor(2.5, dtype=torch.float64)
    cfg = LossConfig(loss_type="dpo", beta=0.5, load_balancing_loss=True, load_balancing_weight=0.01)
    loss = build_loss(cfg)
    assert loss.requirements.router_aux_loss
    out = loss(LossInputs(inputs_of(b).policy, inputs_of(b).reference, aux_loss=aux))
    torch.testing.assert_close(out.loss, out.losses.mean() + 0.01 * aux)
    assert out.metrics["aux_loss"] == aux
    with pytest.raises(ValueError, match="aux_loss is missing"):
        loss(inputs_of(b))


# -- bco_pair's running reward mean -----------------------------------------------------------------------
def _batches(n):
    return [make_batch(20 + i, b=4) for i in range(n)]


def _independent_bco_run(batches, beta):
    """The BCO paper's reward shift: delta_k = mean of the batch-mean rewards of batches 1..k."""
    means, out = [], []
    for b in batches:
        uc, ur = b["pc"] - b["rc"], b["pr"] - b["rr"]
        means.append(beta * torch.cat([uc, ur]).detach().mean())
        delta = torch.stack(means).mean()
        out.append((-logsig(beta * uc - delta) - logsig(-(beta * ur - delta))).mean())
    return out


def test_bco_pair_running_mean_matches_the_paper_and_resumes_exactly():
    beta, batches = 0.4, _batches(5)
    cfg = LossConfig(loss_type="bco_pair", beta=beta)
    want = _independent_bco_run(batches, beta)
    uninterrupted = build_loss(cfg)
    values = [uninterrupted(inputs_of(b)).loss for b in batches]
    for v, w in zip(values, want):
        torch.testing.assert_close(v.float(), w.float(), rtol=1e-6, atol=1e-7)
    first = build_loss(cfg)
    for b in batches[:3]:
        first(inputs_of(b))
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = build_loss(cfg)
    resumed.load_state_dict(state)
    for b, v in zip(batches[3:], values[3:]):
        assert torch.equal(resumed(inputs_of(b)).loss, v)  # bit-exact


def test_bco_pair_eval_mode_freezes_the_shift_and_reduce_mean_is_used():
    beta, batches = 0.4, _batches(3)
    calls = []

    def reduce_mean(t):  # one process: the mean over processes is the value itself
        calls.append(t.clone())
        return t

    loss = build_loss(LossConfig(loss_type="bco_pair", beta=beta), reduce_mean=reduce_mean)
    loss(inputs_of(batches[0]))
    assert len(calls) == 1 and calls[0].dim() == 0
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    loss(inputs_of(batches[1]))
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items()) and len(calls) == 1
    no_shift = build_loss(LossConfig(loss_type="bco_pair", beta=beta, bco_reward_shift=False))(inputs_of(batches[2]))
    torch.testing.assert_close(no_shift.losses, _bco(batches[2], {"beta": beta, "shift": False}))


def test_held_out_margins_use_the_losss_beta_and_kind():
    b = make_batch(15)
    loss = build_loss(LossConfig(loss_type="dpo_norm"))
    assert loss.beta == 5.0 and loss.averaged and not loss.reference_free
    torch.testing.assert_close(loss.margins(inputs_of(b)), 5.0 * _d_avg(b).detach())
    free = build_loss(LossConfig(loss_type="simpo"))
    torch.testing.assert_close(free.margins(inputs_of(b, reference=False)),
                               (b["pc"] / b["nc"] - b["pr"] / b["nr"]).detach())


@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.5}, {"use_weighting": True},
                                     {"load_balancing_loss": True, "sft_weight": 0.3}])
def test_no_host_synchronisation(options):
    """Every loss, forward and backward, on the ``meta`` device: any read of a value on the host (``.item()``,
    ``bool()``, ``float()``, a data-dependent Python branch) raises there, so passing proves the loss and its
    metrics never synchronise with the host, as on an accelerator."""
    with pytest.raises(RuntimeError):
        torch.empty((), device="meta").item()  # the probe is live
    b, t = 4, 7

    def tensor(*shape, grad=False):
        return torch.empty(*shape, device="meta").requires_grad_(grad)

    count = torch.empty(b, dtype=torch.long, device="meta")
    mask = torch.empty(b, t, dtype=torch.bool, device="meta")
    for name in all_names():
        refused = (name.startswith("aot") and "use_weighting" in options) or (name == "sft" and "sft_weight" in options)
        if refused:  # by the configuration (tested with the options)
            continue
        cfg = LossConfig(loss_type=name, label_smoothing=1e-3 if name == "exo_pair" else 0.0, **options)
        pc, pr, tc, tr = tensor(b, grad=True), tensor(b, grad=True), tensor(b, t, grad=True), tensor(b, t, grad=True)
        inputs = LossInputs(SequenceLogps(pc, pr, count, count), SequenceLogps(tensor(b), tensor(b), count, count),
                            PairTokens(tc, tr, mask, mask), PairTokens(tensor(b, t), tensor(b, t), mask, mask),
                            PairTokens(tensor(b, t), tensor(b, t), mask, mask), aux_loss=tensor(()))
        out = build_loss(cfg)(inputs)
        out.loss.backward()
        assert out.loss.device.type == "meta" and all(v.device.type == "meta" for v in out.metrics.values())

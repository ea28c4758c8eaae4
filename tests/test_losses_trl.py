"""The losses TRL 1.16 implements, against TRL's own computation on the same inputs (values and gradients).

TRL computes its losses inside ``DPOTrainer._compute_loss(model, inputs)``, from the per-token log-probs
that the model's fused output head returns. The trainer is built without a model (``object.__new__`` plus
the attributes the loss reads, with a real ``accelerate.Accelerator``) and the policy and reference are
stand-ins whose forward returns given per-token log-probs: every line of TRL's loss code runs unchanged.
ORPO and SimPO are compared with TRL's ``ORPOTrainer.odds_ratio_loss`` and ``CPOTrainer.cpo_loss``.
"""

import os
import types
from collections import defaultdict

import pytest
import torch
from accelerate import Accelerator

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

from dpocache.losses import LossConfig, LossInputs, PairTokens, SequenceLogps, build_loss

B, T = 5, 14
# TRL builds exo_pair's epsilon as a float32 tensor: its log differs from float64's by ~1e-8 relative.
EXO_TOL = 1e-6


def tol_for(name):
    return EXO_TOL if name == "exo_pair" else 1e-10


TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class FusedHead(torch.nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns the given per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq=None):
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, **_):
        zeros = torch.zeros_like(self.log_probs)
        return types.SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool(), aux_loss=None,
                                     log_sum_sq_probs=zeros if self.log_sum_sq is None else self.log_sum_sq)


def make_tokens(seed, dtype=torch.float64):
    """[2B, T] per-token log-probs (chosen rows first), zero outside each completion, and the masks."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, 4, (1,), generator=g))
        mask[i, start:start + int(torch.randint(1, T - start, (1,), generator=g))] = 1
    leaf = (-torch.rand(2 * B, T, generator=g, dtype=dtype) * 2.5).requires_grad_()
    ref = -torch.rand(2 * B, T, generator=g, dtype=dtype) * 2.5 * mask
    sq = -torch.rand(2 * B, T, generator=g, dtype=dtype) * 0.5 * mask
    return leaf, ref, sq, mask


def trl_loss(losses, weights, *, beta, ls=0.0, ld_alpha=None, f_div="reverse_kl", f_alpha=0.5, weighting=False,
             tau=0.05, policy, reference, sq, mask):
    tr = object.__new__(DPOTrainer)
    tr.model = FusedHead(policy[:, 1:], sq[:, 1:])
    tr.ref_model = FusedHead(reference[:, 1:])
    tr.accelerator = Accelerator(cpu=True)
    tr.args = types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None)
    tr.aux_loss_enabled, tr.precompute_ref_logps, tr._tp_size, tr._total_train_tokens = False, False, 1, 0
    tr.ld_alpha, tr.f_divergence_type, tr.f_alpha_divergence_coef = ld_alpha, f_div, f_alpha
    tr.loss_types, tr.loss_weights, tr.beta, tr.label_smoothing = losses, weights, beta, ls
    tr.use_weighting = weighting
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    return tr._compute_loss(tr.model, inputs, False), {k: v[-1] for k, v in tr._metrics["train"].items()}


def our_loss(cfg, *, policy, reference, sq, mask):
    m = mask.bool()
    counts = m.sum(-1)

    def seq(x):
        sums = torch.where(m, x, 0).sum(-1)
        return SequenceLogps(sums[:B], sums[B:], counts[:B], counts[B:])

    def tokens(x):
        return PairTokens(x[:B], x[B:], m[:B], m[B:])

    inputs = LossInputs(seq(policy), seq(reference), tokens(policy), tokens(reference), tokens(sq))
    return build_loss(cfg)(inputs)


def compare(cfg, trl_kwargs, seed=0, dtype=torch.float64, tol=1e-10):
    leaf, ref, sq, mask = make_tokens(seed, dtype)
    policy = leaf * mask
    data = dict(policy=policy, reference=ref, sq=sq, mask=mask)
    ours = our_loss(cfg, **data)
    theirs, metrics = trl_loss(**trl_kwargs, **data)
    torch.testing.assert_close(ours.loss, theirs.to(ours.loss.dtype), rtol=tol, atol=tol)
    got = torch.autograd.grad(ours.loss, leaf, retain_graph=True)[0]
    want = torch.autograd.grad(theirs, leaf)[0]
    torch.testing.assert_close(got, want, rtol=tol * 10, atol=tol * 10)
    return ours, metrics


@pytest.mark.parametrize("name", TRL_LOSSES)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_trl_loss_matches_trl(name, seed):
    ls = {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)
    cfg = LossConfig(loss_type=name, beta=0.3, label_smoothing=ls, bco_reward_shift=False)
    compare(cfg, dict(losses=[name], weights=[1.0], beta=0.3, ls=ls), seed, tol=tol_for(name))


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "nca_pair", "apo_down"])
def test_trls_default_beta_is_ours(name):
    cfg = LossConfig(loss_type=name)
    assert cfg.beta == 0.1
    ours, metrics = compare(cfg, dict(losses=[name], weights=[1.0], beta=0.1), seed=2)
    for key, trl_key in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins"),
                         ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]:
        assert ours.metrics[key].item() == pytest.approx(metrics[trl_key], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired", "exo_pair", "robust"])
def test_label_smoothing_matches_trl(name):
    cfg = LossConfig(loss_type=name, beta=0.2, label_smoothing=0.2)
    compare(cfg, dict(losses=[name], weights=[1.0], beta=0.2, ls=0.2), seed=3, tol=tol_for(name))


@pytest.mark.parametrize("losses,weights", [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
                                            (["sigmoid_norm", "sft"], [1.0, 0.5]),
                                            (["ipo", "apo_zero", "hinge"], [0.3, 0.3, 0.4])])
def test_weighted_combinations_match_trl(losses, weights):
    cfg = LossConfig(loss_type=",".join(losses), loss_weights=",".join(map(str, weights)), beta=0.25,
                     bco_reward_shift=False)
    compare(cfg, dict(losses=losses, weights=weights, beta=0.25), seed=4)


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm", "ipo", "apo_zero", "bco_pair"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ld_alpha_matches_trl(name, alpha):
    cfg = LossConfig(loss_type=name, beta=0.3, ld_alpha=alpha, bco_reward_shift=False)
    compare(cfg, dict(losses=[name], weights=[1.0], beta=0.3, ld_alpha=alpha), seed=5)


@pytest.mark.parametrize("kind", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"])
def test_f_divergences_match_trl(kind, name):
    ls = {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)
    cfg = LossConfig(loss_type=name, beta=0.3, label_smoothing=ls, f_divergence_type=kind)
    compare(cfg, dict(losses=[name], weights=[1.0], beta=0.3, ls=ls, f_div=kind), seed=6,
            tol=tol_for(name))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "discopop"])
@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_alpha_divergence_matches_trl_in_fp32(name, coef):
    """TRL's alpha divergence supports fp16/bf16/fp32 only."""
    cfg = LossConfig(loss_type=name, beta=0.3, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef)
    compare(cfg, dict(losses=[name], weights=[1.0], beta=0.3, f_div="alpha_divergence", f_alpha=coef), seed=7,
            dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("losses", [["sigmoid"], ["ipo"], ["nca_pair"], ["bco_pair"], ["sigmoid", "nca_pair"]])
def test_wpo_weighting_matches_trl(losses):
    """TRL 1.16 multiplies each loss by the weights in place, which fails for sft (an expanded tensor) and for
    hinge (relu saves its output for backward); ours weights them too (checked against the formula)."""
    cfg = LossConfig(loss_type=",".join(losses), beta=0.3, use_weighting=True, bco_reward_shift=False)
    compare(cfg, dict(losses=losses, weights=[1.0] * len(losses), beta=0.3, weighting=True), seed=8)


def test_orpo_matches_trls_orpo_trainer():
    """ORPO = chosen NLL (a token-level cross-entropy, as TRL's ORPOTrainer computes it) - mean(beta log sigma)."""
    g = torch.Generator().manual_seed(9)
    vocab = 11
    logits = torch.randn(2 * B, T, vocab, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, vocab, (2 * B, T), generator=g)
    _, _, _, mask = make_tokens(9)
    token_logps = torch.zeros(2 * B, T, dtype=torch.float64)
    token_logps[:, 1:] = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask.bool()
    sums, counts = torch.where(m, token_logps, 0).sum(-1), m.sum(-1)
    ours = build_loss(LossConfig(loss_type="orpo", beta=0.2))(
        LossInputs(SequenceLogps(sums[:B], sums[B:], counts[:B], counts[B:])))

    trainer = object.__new__(ORPOTrainer)
    trainer.beta, trainer.accelerator = 0.2, Accelerator(cpu=True)
    avg = sums / counts
    odds_losses = trainer.odds_ratio_loss(avg[:B], avg[B:])[0]
    labels = ids.masked_fill(~m, -100)[:B]
    nll = torch.nn.CrossEntropyLoss()(logits[:B, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
    theirs = nll - odds_losses.mean()
    torch.testing.assert_close(ours.loss.float(), theirs.float(), rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(ours.loss, logits, retain_graph=True)[0]
    want = torch.autograd.grad(theirs, logits)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_trls_cpo_trainer(ls):
    leaf, _, _, mask = make_tokens(10)
    policy = leaf * mask
    m = mask.bool()
    sums, counts = policy.sum(-1), m.sum(-1)
    beta, ratio = 2.0, 0.3
    ours = build_loss(LossConfig(loss_type="simpo", beta=beta, gamma_beta_ratio=ratio, label_smoothing=ls))(
        LossInputs(SequenceLogps(sums[:B], sums[B:], counts[:B], counts[B:])))
    trainer = object.__new__(CPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.loss_type, trainer.alpha = beta, ls, "simpo", 0.0
    trainer.simpo_gamma, trainer.accelerator = beta * ratio, Accelerator(cpu=True)
    avg = sums / counts
    theirs = trainer.cpo_loss(avg[:B], avg[B:])[0].mean()
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(ours.loss, leaf, retain_graph=True)[0]
    torch.testing.assert_close(got, torch.autograd.grad(theirs, leaf)[0], rtol=1e-9, atol=1e-12)

"""Losses that need no reference model (no store): the policy's own log-probs only.

Notation as in :mod:`dpocache.losses.pairwise`; ``avg`` is a per-token average log-prob.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpocache.losses.pair import Pair
from dpocache.losses.registry import register


def chosen_nll(p: Pair) -> torch.Tensor:
    """The chosen responses' negative log-likelihood per token over the whole batch (a token-level mean,
    as a causal-LM cross-entropy computes it): ``-sum_B pi_c / sum_B |y_c|``, 0-d."""
    return -p.policy.chosen_sum.sum() / p.policy.chosen_count.sum().clamp(min=1).to(p.policy.chosen_sum.dtype)


@register("simpo", beta=2.0, averaged=True, reference=False, paper="https://arxiv.org/abs/2405.14734")
def simpo(p: Pair, *, beta: float, gamma_beta_ratio: float, label_smoothing: float) -> torch.Tensor:
    """SimPO: the average log-prob as the implicit reward, with a target margin ``gamma = beta * ratio``.

    ``x = beta (avg pi_c - avg pi_r - gamma_beta_ratio)``: ``-(1 - ls) log sigma(x) - ls log sigma(-x)``.
    Default beta 2.0 as the paper's reference configuration; ``--gamma_beta_ratio`` 0.3 as open-instruct.
    """
    x = beta * (p.chosen - p.rejected - gamma_beta_ratio)
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation on either side of ``-log 2``."""
    x = x.clamp(max=-torch.finfo(x.dtype).eps)  # avg log-prob 0 (probability 1) would give log 0
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register("orpo", beta=0.1, averaged=True, reference=False, paper="https://arxiv.org/abs/2403.07691")
def orpo(p: Pair, *, beta: float) -> torch.Tensor:
    """ORPO: the SFT loss plus ``beta`` (the paper's lambda) times an odds-ratio preference term.

    ``log_odds = (avg pi_c - avg pi_r) - (log(1 - exp(avg pi_c)) - log(1 - exp(avg pi_r)))``;
    per example ``NLL - beta log sigma(log_odds)`` where NLL is the batch's chosen negative
    log-likelihood per token (see :func:`chosen_nll`), as TRL's ORPOTrainer.
    """
    log_odds = (p.chosen - p.rejected) - (_log1mexp(p.chosen) - _log1mexp(p.rejected))
    return chosen_nll(p) - beta * F.logsigmoid(log_odds)


@register("sft", beta=0.1, averaged=True, reference=False, f_divergence=True,
          paper="https://arxiv.org/abs/2411.10442")
def sft(p: Pair) -> torch.Tensor:
    """Supervised fine-tuning on the chosen responses: their negative log-likelihood per token.

    ``-sum_B pi_c / sum_B |y_c|`` over the batch (TRL's ``sft``; MPO combines it as ``sigmoid,bco_pair,sft``
    with weights ``0.8,0.2,1.0``), the same value for every example. ``--sft_weight w`` adds it with weight w.
    """
    return chosen_nll(p).expand(p.policy.chosen_sum.shape[0])

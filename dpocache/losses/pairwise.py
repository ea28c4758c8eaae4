"""Losses on the pair margin ``d = s_c - s_r`` (the chosen score minus the rejected score).

Notation (see :class:`~dpocache.losses.pair.Pair`): ``pi`` policy and ``ref`` reference log-probs,
``c`` chosen, ``r`` rejected, ``s = f'(pi/ref)`` the score of a log-ratio (``s = pi - ref`` under the
default reverse KL), ``d = s_c - s_r``, ``ls`` the label smoothing, ``sigma`` the logistic function.
Every function maps a :class:`Pair` of ``[B]`` tensors to ``[B]`` per-example losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpocache.losses.pair import Pair
from dpocache.losses.registry import register


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


@register("dpo", aliases={"sigmoid": 0.1}, beta=0.1, f_divergence=True,
          paper="https://arxiv.org/abs/2305.18290")
def dpo(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO: logistic (Bradley-Terry) loss on the margin of SUMMED log-probs; TRL's ``sigmoid``.

    ``-(1 - ls) log sigma(beta d) - ls log sigma(-beta d)``, ``d = (pi_c - ref_c) - (pi_r - ref_r)``.
    ``ls > 0`` is conservative DPO (https://ericmitchell.ai/cdpo.pdf), as open-instruct applies it; TRL
    1.16's ``sigmoid`` ignores ``label_smoothing`` (equal at the default 0).
    """
    return _smoothed_logistic(beta * p.margin, label_smoothing)


@register("dpo_norm", aliases={"sigmoid_norm": 0.1}, beta=5.0, averaged=True, f_divergence=True,
          paper="https://arxiv.org/abs/2411.15124")
def dpo_norm(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Length-normalised DPO: the ``dpo`` formula on per-token AVERAGED log-probs (policy and reference).

    open-instruct's ``dpo_norm`` (Tulu 3, beta 5) and TRL's ``sigmoid_norm`` (TRL default beta 0.1):
    ``d = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|``.
    """
    return _smoothed_logistic(beta * p.margin, label_smoothing)


@register("wpo", beta=0.1, paper="https://arxiv.org/abs/2406.11827")
def wpo(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Weighted preference optimisation as open-instruct implements it: ``dpo`` times a per-pair weight.

    ``w = min(1, exp(avg pi_c + avg pi_r))`` with per-token average policy log-probs, detached, per
    example (open-instruct's own broadcast is right only at batch size 1). TRL's variant, the aligned
    weights of the paper's Eq. 2, is ``--use_weighting`` and works with every loss.
    """
    weight = torch.exp(p.policy.chosen_avg() + p.policy.rejected_avg()).clamp(max=1.0).detach()
    return _smoothed_logistic(beta * p.margin, label_smoothing) * weight


@register("ipo", beta=0.1, averaged=True, f_divergence=True, paper="https://arxiv.org/abs/2310.12036")
def ipo(p: Pair, *, beta: float) -> torch.Tensor:
    """IPO: squared distance of the AVERAGED margin to ``1 / (2 beta)`` (beta is the paper's tau).

    ``(d - 1 / (2 beta))^2`` with per-token averaged log-ratios, as TRL (confirmed with the authors).
    """
    return (p.margin - 1 / (2 * beta)) ** 2


@register("hinge", beta=0.1, f_divergence=True, paper="https://arxiv.org/abs/2309.06657")
def hinge(p: Pair, *, beta: float) -> torch.Tensor:
    """SLiC / RSO hinge loss on the margin of SUMMED log-probs (a support-vector form of DPO).

    ``relu(1 - beta d)``.
    """
    return torch.relu(1 - beta * p.margin)


@register("robust", beta=0.1, f_divergence=True, paper="https://arxiv.org/abs/2403.00409")
def robust(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: unbiased under a label-flip rate ``ls`` in [0, 0.5) (paper suggests 0.1).

    ``[-(1 - ls) log sigma(beta d) + ls log sigma(-beta d)] / (1 - 2 ls)`` on SUMMED log-probs.
    """
    return ((-(1 - label_smoothing) * F.logsigmoid(beta * p.margin)
             + label_smoothing * F.logsigmoid(-beta * p.margin)) / (1 - 2 * label_smoothing))


@register("exo_pair", beta=0.1, f_divergence=True, paper="https://arxiv.org/abs/2402.00856")
def exo_pair(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (pairwise, Eq. 16): reverse KL from the label distribution ``[1 - eps, eps]`` to the policy's.

    ``q = sigma(beta d)``: ``q (log q - log(1 - eps)) + (1 - q) (log(1 - q) - log eps)`` with ``eps = ls``,
    which must be > 0 (the paper recommends 1e-3).
    """
    logits = beta * p.margin
    eps = torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    q_w, q_l = torch.sigmoid(logits), torch.sigmoid(-logits)
    return (q_w * (F.logsigmoid(logits) - torch.log1p(-eps))
            + q_l * (F.logsigmoid(-logits) - torch.log(eps)))


@register("discopop", beta=0.1, f_divergence=True, paper="https://arxiv.org/abs/2406.08414")
def discopop(p: Pair, *, beta: float, discopop_tau: float) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss, Eq. 5): logistic and exponential losses blended by the margin.

    ``x = beta d``, ``m = sigma(x / tau)``: ``(1 - m) (-log sigma(x)) + m exp(-x)``. The exponential part
    is computed as ``exp(-x + log sigma(x / tau))``, which stays finite for very negative margins.
    """
    x = beta * p.margin
    modulation = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(F.logsigmoid(x / discopop_tau) - x)


@register("aot", beta=0.1, weighting=False, paper="https://arxiv.org/abs/2406.05882")
def aot(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT (paired): distributional alignment via optimal transport, by sorting over the batch.

    ``delta = sort_B(pi_c - pi_r) - sort_B(ref_c - ref_r)``;
    ``-(1 - ls) log sigma(beta delta) - ls log sigma(-beta delta)`` on SUMMED log-probs. Sorting mixes
    pairs, so per-pair weights (``--use_weighting``) do not apply.
    """
    policy, _ = torch.sort(p.chosen - p.rejected, dim=0)
    reference, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_logistic(beta * (policy - reference), label_smoothing)


@register("aot_unpaired", beta=0.1, weighting=False, paper="https://arxiv.org/abs/2406.05882")
def aot_unpaired(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT (unpaired): the chosen and rejected log-ratio distributions aligned by sorting each over the batch.

    ``delta = sort_B(pi_c - ref_c) - sort_B(pi_r - ref_r)``, then as ``aot``.
    """
    chosen, _ = torch.sort(p.chosen_logratio, dim=0)
    rejected, _ = torch.sort(p.rejected_logratio, dim=0)
    return _smoothed_logistic(beta * (chosen - rejected), label_smoothing)

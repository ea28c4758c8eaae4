"""Losses on each response's own log-ratio ``u_c = pi_c - ref_c`` and ``u_r = pi_r - ref_r``.

Notation as in :mod:`dpocache.losses.pairwise`; all on SUMMED (``--ld_alpha``: desensitised) log-probs.
These losses have no f-divergence generalisation (the reparameterisation's ``beta log Z(x)`` term only
cancels in the chosen-minus-rejected difference), so they run with the default reverse KL only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpocache.losses.pair import Pair
from dpocache.losses.registry import register


@register("nca_pair", beta=0.1, paper="https://arxiv.org/abs/2402.05369")
def nca_pair(p: Pair, *, beta: float) -> torch.Tensor:
    """NCA (pairwise noise contrastive alignment): raise the chosen reward in absolute terms.

    ``-log sigma(beta u_c) - 0.5 log sigma(-beta u_c) - 0.5 log sigma(-beta u_r)``.
    """
    chosen, rejected = beta * p.chosen_logratio, beta * p.rejected_logratio
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register("bco_pair", beta=0.1, paper="https://arxiv.org/abs/2404.04656")
def bco_pair(p: Pair, *, beta: float, reward_shift: torch.Tensor) -> torch.Tensor:
    """BCO (paired): a binary classifier whose logit is the reward, chosen as 1 and rejected as 0.

    ``-log sigma(beta u_c - delta) - log sigma(-(beta u_r - delta))``. ``delta`` is the paper's reward
    shift: the running mean of the batch-mean rewards ``mean(beta u_c, beta u_r)`` over training (kept
    in the loss state, averaged across processes, restored on resume); ``--bco_reward_shift false``
    makes it 0, as TRL 1.16's ``bco_pair``.
    """
    return (-F.logsigmoid(beta * p.chosen_logratio - reward_shift)
            - F.logsigmoid(-(beta * p.rejected_logratio - reward_shift)))


@register("sppo_hard", beta=0.1, paper="https://arxiv.org/abs/2405.00675")
def sppo_hard(p: Pair, *, beta: float) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected), Eq. 4.7 of the paper.

    ``(u_c - 1 / (2 beta))^2 + (u_r + 1 / (2 beta))^2``.
    """
    return (p.chosen_logratio - 0.5 / beta) ** 2 + (p.rejected_logratio + 0.5 / beta) ** 2


@register("apo_zero", beta=0.1, paper="https://arxiv.org/abs/2408.06266")
def apo_zero(p: Pair, *, beta: float) -> torch.Tensor:
    """APO-zero (Eq. 7): raise the chosen likelihood, lower the rejected one (chosen better than the model).

    ``1 - sigma(beta u_c) + sigma(beta u_r)``.
    """
    return 1 - torch.sigmoid(beta * p.chosen_logratio) + torch.sigmoid(beta * p.rejected_logratio)


@register("apo_down", beta=0.1, paper="https://arxiv.org/abs/2408.06266")
def apo_down(p: Pair, *, beta: float) -> torch.Tensor:
    """APO-down (Eq. 8): lower both likelihoods, the rejected more (chosen worse than the model's outputs).

    ``sigma(beta u_c) + 1 - sigma(beta (u_c - u_r))``.
    """
    return (torch.sigmoid(beta * p.chosen_logratio)
            + 1 - torch.sigmoid(beta * (p.chosen_logratio - p.rejected_logratio)))


@register("kto_pair", beta=0.1, paper="https://arxiv.org/abs/2402.01306")
def kto_pair(p: Pair, *, beta: float) -> torch.Tensor:
    """KTO on paired data (desirable = chosen, undesirable = rejected, lambda_D = lambda_U = 1).

    Reference points from the batch, clamped at 0 and not back-propagated (as the paper's z_0):
    ``z_c = max(0, mean_B u_c)``, ``z_r = max(0, mean_B u_r)``. Per pair, the mean of the chosen and the
    rejected terms: ``0.5 [1 - sigma(beta (u_c - z_r))] + 0.5 [1 - sigma(beta (z_c - u_r))]`` (the batch
    mean equals TRL's former ``kto_pair`` mean over its 2B terms).
    """
    z_chosen = p.chosen_logratio.mean().clamp(min=0).detach()
    z_rejected = p.rejected_logratio.mean().clamp(min=0).detach()
    chosen = 1 - torch.sigmoid(beta * (p.chosen_logratio - z_rejected))
    rejected = 1 - torch.sigmoid(beta * (z_chosen - p.rejected_logratio))
    return 0.5 * (chosen + rejected)

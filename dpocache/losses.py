"""DPO-family losses: pure functions of sequence log-probs (no model, no I/O).

Inputs are per-example tensors of shape ``[B]``: log-prob SUMS over trainable tokens and trainable
token COUNTS, for the policy (``pi``) and the reference (``ref``), chosen (``c``) and rejected (``r``).
Sum-based losses use the sums; average-based losses divide by ``max(count, 1)`` (an all-masked row
gives 0, never NaN). Formulas follow open-instruct's ``dpo_utils`` and TRL (see docs/losses.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["dpo", "dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust"]
LOSS_TYPES: tuple[str, ...] = ("dpo", "dpo_norm", "simpo", "wpo", "ipo", "hinge", "robust")
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})
AVERAGED: frozenset[str] = frozenset({"dpo_norm", "simpo", "ipo"})


@dataclass
class SequenceLogps:
    """Sums and counts of log-probs over the trainable tokens of chosen and rejected."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor

    def chosen_avg(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_count.clamp(min=1).to(self.chosen_sum.dtype)

    def rejected_avg(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_count.clamp(min=1).to(self.rejected_sum.dtype)

    def pick(self, averaged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if averaged:
            return self.chosen_avg(), self.rejected_avg()
        return self.chosen_sum, self.rejected_sum


@dataclass
class LossOutput:
    """Per-example loss (``[B]``, differentiable) and the detached quantities that metrics use."""

    losses: torch.Tensor
    chosen_logps: torch.Tensor  # policy log-probs as used by the loss (sum or average), detached
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor | None  # beta * (pi - ref), detached; None for reference-free losses
    rejected_rewards: torch.Tensor | None


def _sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


def preference_loss(
    loss_type: str,
    policy: SequenceLogps,
    reference: SequenceLogps | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma_beta_ratio: float = 0.3,
    sft_weight: float = 0.0,
) -> LossOutput:
    """Compute the per-example preference loss of ``loss_type``.

    - ``dpo``: -logsigmoid(beta*d) with d = (pi_c - pi_r) - (ref_c - ref_r) on SUMS (conservative
      DPO with ``label_smoothing``).
    - ``dpo_norm``: the same on per-token AVERAGES.
    - ``simpo``: reference-free, averages, d = (pi_c - pi_r) - gamma_beta_ratio.
    - ``wpo``: ``dpo`` weighted per example by min(1, exp(avg_pi_c + avg_pi_r)) (detached).
    - ``ipo``: (d - 1/(2 beta))^2 with d on averaged log-ratios.
    - ``hinge``: relu(1 - beta*d) on sums.
    - ``robust``: [-(1-ls) logsigmoid(beta d) + ls logsigmoid(-beta d)] / (1 - 2 ls) on sums.
    ``sft_weight`` adds ``sft_weight * (-avg_pi_c)`` (chosen negative log-likelihood per token).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if loss_type not in REFERENCE_FREE and reference is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    averaged = loss_type in AVERAGED
    pi_c, pi_r = policy.pick(averaged)
    if loss_type == "simpo":
        logits = (pi_c - pi_r) - gamma_beta_ratio
        losses = _sigmoid_loss(logits, beta, label_smoothing)
        chosen_rewards = rejected_rewards = None
    else:
        ref_c, ref_r = reference.pick(averaged)
        ref_c, ref_r = ref_c.to(pi_c.dtype), ref_r.to(pi_r.dtype)
        logits = (pi_c - pi_r) - (ref_c - ref_r)
        if loss_type in ("dpo", "dpo_norm", "wpo"):
            losses = _sigmoid_loss(logits, beta, label_smoothing)
            if loss_type == "wpo":
                weight = torch.clamp(torch.exp(policy.chosen_avg() + policy.rejected_avg()), max=1.0)
                losses = losses * weight.detach()
        elif loss_type == "ipo":
            losses = (logits - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - beta * logits)
        else:  # robust
            if not label_smoothing < 0.5:
                raise ValueError("robust loss needs label_smoothing < 0.5")
            losses = ((-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                       + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing))
        chosen_rewards = (beta * (pi_c - ref_c)).detach()
        rejected_rewards = (beta * (pi_r - ref_r)).detach()
    if sft_weight:
        losses = losses + sft_weight * (-policy.chosen_avg())
    return LossOutput(losses, pi_c.detach(), pi_r.detach(), chosen_rewards, rejected_rewards)


def batch_metrics(out: LossOutput) -> dict[str, float]:
    """The seed's per-batch metrics, with their exact names (averaged later over micro-batches)."""
    metrics = {
        "train_loss": out.losses.detach().mean().item(),
        "logps/chosen": out.chosen_logps.mean().item(),
        "logps/rejected": out.rejected_logps.mean().item(),
    }
    if out.chosen_rewards is not None:
        rc, rr = out.chosen_rewards, out.rejected_rewards
        metrics.update({
            "rewards/chosen": rc.mean().item(),
            "rewards/rejected": rr.mean().item(),
            "rewards/average": ((rc + rr) / 2).mean().item(),
            "rewards/accuracy": (rc > rr).float().mean().item(),
            "rewards/margin": (rc - rr).mean().item(),
        })
    return metrics

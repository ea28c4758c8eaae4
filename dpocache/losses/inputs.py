"""What a preference loss reads and returns: plain containers of tensors, no computation.

Shapes: ``B`` pairs per batch, ``T`` token positions. Sequence values are ``[B]`` tensors (log-prob SUMS
over the trainable tokens of a response, and the COUNT of those tokens); per-token values are ``[B, T]``
tensors with a trainable mask of the same shape (position ``t`` holds ``log p(token_t | tokens_<t)``,
values at untrained positions are ignored). Everything a loss returns stays on the device of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceLogps:
    """Sums and counts of log-probs over the trainable tokens of chosen and rejected (``[B]`` each)."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor

    def chosen_avg(self) -> torch.Tensor:
        return self.chosen_sum / self.chosen_count.clamp(min=1).to(self.chosen_sum.dtype)

    def rejected_avg(self) -> torch.Tensor:
        return self.rejected_sum / self.rejected_count.clamp(min=1).to(self.rejected_sum.dtype)

    def pick(self, averaged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected): per-token averages when ``averaged``, else sums."""
        if averaged:
            return self.chosen_avg(), self.rejected_avg()
        return self.chosen_sum, self.rejected_sum


@dataclass
class PairTokens:
    """Per-token values of chosen and rejected: ``[B, Tc]`` and ``[B, Tr]`` with their trainable masks."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor

    def masked_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` sums over the trainable positions (values elsewhere, even NaN padding, are ignored)."""
        return (torch.where(self.chosen_mask.bool(), self.chosen, 0).sum(-1),
                torch.where(self.rejected_mask.bool(), self.rejected, 0).sum(-1))


@dataclass
class LossInputs:
    """One micro-batch as the loss sees it.

    - ``policy``: policy sums (differentiable) and counts; always required.
    - ``reference``: reference sums and counts (from the store); None for reference-free losses.
    - ``policy_tokens`` / ``reference_tokens``: per-token log-probs, needed by ``--ld_alpha`` (the reference's
      come from a store scored with ``--save_token_logps``).
    - ``policy_log_sum_sq``: per-token ``logsumexp(2 * log_softmax(logits))`` of the policy (no gradient
      needed), needed by ``--use_weighting``.
    - ``aux_loss``: the MoE router load-balancing loss (0-d), needed by ``--load_balancing_loss``.
    """

    policy: SequenceLogps
    reference: SequenceLogps | None = None
    policy_tokens: PairTokens | None = None
    reference_tokens: PairTokens | None = None
    policy_log_sum_sq: PairTokens | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class LossOutput:
    """``loss``: the 0-d tensor to back-propagate; ``losses``: ``[B]`` per-example losses (the weighted sum
    of the components; ``loss`` is their mean plus the weighted router loss); ``metrics``: detached 0-d
    tensors on the inputs' device, named as open-instruct logs them plus ``loss/<name>`` per component."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Requirements:
    """What every batch must carry for a configured loss (see :class:`LossInputs`)."""

    reference: bool  # reference sums and counts: a store (False: reference-free, no store needed)
    reference_tokens: bool  # per-token reference log-probs: a store scored with --save_token_logps
    policy_tokens: bool  # per-token policy log-probs ([B, T] with masks)
    policy_log_sum_sq: bool  # per-token logsumexp(2 * log_softmax(logits)) of the policy
    router_aux_loss: bool  # the MoE load-balancing loss from the model's router logits

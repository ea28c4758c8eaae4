"""The ``[B]`` view of a batch that every loss function reads: :class:`Pair`, built by :class:`Views`.

Two transformations happen here, once per batch, before any loss:

- **Length desensitisation** (LD-DPO, https://arxiv.org/abs/2409.06411, ``--ld_alpha a``): each sequence
  log-prob becomes ``sum(first k tokens) + a * sum(the rest)`` with ``k = min(|y_c|, |y_r|)``, the shorter
  response's length, for the policy AND the reference (as the paper defines the desensitised likelihood
  of both, and as TRL computes it). It needs per-token values of both.
- **f-divergence scores** (f-DPO, https://arxiv.org/abs/2309.16240, ``--f_divergence_type``): the score of
  a log-ratio ``u = log pi/ref`` is ``f'(pi/ref)``: reverse KL ``u``; forward KL ``1 - exp(-u)``; JS
  divergence ``log 2 + logsigmoid(u)``; alpha divergence ``(exp((alpha-1) u) - 1) / (alpha-1)``
  (``--f_alpha_divergence_coef``; alpha = 1 is reverse KL). Exponents are clamped at 80 (11 in fp16) so
  the score stays finite, as TRL does for the alpha divergence.

Scores are taken on the (desensitised) SUMMED log-ratios; a loss on averages divides them by the
response's token count, as TRL does for ``ipo`` and ``sigmoid_norm`` (with reverse KL this is exactly
the log-ratio of the averages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpocache.losses.inputs import LossInputs, PairTokens, SequenceLogps

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class Pair:
    """One batch of ``B`` pairs as a loss reads it (``[B]`` tensors).

    ``chosen``/``rejected`` are policy log-probs and ``ref_chosen``/``ref_rejected`` reference log-probs
    (None without a reference), SUMS or per-token AVERAGES as the loss is registered, desensitised with
    ``--ld_alpha``. ``chosen_score``/``rejected_score`` are the f-divergence scores of the log-ratios (the
    log-ratios themselves under reverse KL). ``policy`` holds the plain policy sums and counts for terms
    defined per token (the SFT negative log-likelihood, WPO's weights).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_score: torch.Tensor | None
    rejected_score: torch.Tensor | None
    policy: SequenceLogps

    @property
    def chosen_logratio(self) -> torch.Tensor:
        """``log pi(y_c) - log ref(y_c)``."""
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratio(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        """``d = s_c - s_r``: the chosen score minus the rejected score (under reverse KL, the DPO logit
        ``(pi_c - pi_r) - (ref_c - ref_r)``)."""
        return self.chosen_score - self.rejected_score


def desensitised_sums(tokens: PairTokens, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO sums: trainable tokens up to the shorter response's length count fully, later ones ``alpha``."""
    cm, rm = tokens.chosen_mask.bool(), tokens.rejected_mask.bool()
    shared = torch.minimum(cm.sum(-1), rm.sum(-1))[:, None]

    def one(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = mask.cumsum(-1)  # 1-based rank of each trainable token
        head = torch.where(mask & (position <= shared), values, 0).sum(-1)
        tail = torch.where(mask & (position > shared), values, 0).sum(-1)
        return head + alpha * tail

    return one(tokens.chosen, cm), one(tokens.rejected, rm)


def _exp_clamped(x: torch.Tensor) -> torch.Tensor:
    limit = 11.0 if x.dtype == torch.float16 else 80.0
    return torch.exp(x.clamp(max=limit))


def f_score(logratio: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """``f'(pi/ref)`` of a log-ratio for the f-divergence ``kind`` (see the module docstring)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio
    if kind == "forward_kl":
        return 1 - _exp_clamped(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if kind == "alpha_divergence":
        return (_exp_clamped((alpha - 1.0) * logratio) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}; expected one of {', '.join(F_DIVERGENCES)}")


class Views:
    """Builds the sum and average :class:`Pair` of one batch, each at most once."""

    def __init__(self, inputs: LossInputs, *, ld_alpha: float | None, f_divergence_type: str,
                 f_alpha_divergence_coef: float):
        policy, reference = inputs.policy, inputs.reference
        self.policy = policy
        self.counts = (policy.chosen_count.clamp(min=1).to(policy.chosen_sum.dtype),
                       policy.rejected_count.clamp(min=1).to(policy.rejected_sum.dtype))
        if ld_alpha is None:
            self.sums = (policy.chosen_sum, policy.rejected_sum)
        else:
            self.sums = desensitised_sums(inputs.policy_tokens, ld_alpha)
        self.ref_sums = self.scores = None
        if reference is not None:
            if ld_alpha is None:
                ref = (reference.chosen_sum, reference.rejected_sum)
            else:
                ref = desensitised_sums(inputs.reference_tokens, ld_alpha)
            self.ref_sums = tuple(r.to(s.dtype) for r, s in zip(ref, self.sums))
            self.scores = tuple(f_score(s - r, f_divergence_type, f_alpha_divergence_coef)
                                for s, r in zip(self.sums, self.ref_sums))
        self._cache: dict[bool, Pair] = {}

    def get(self, averaged: bool) -> Pair:
        if averaged not in self._cache:
            self._cache[averaged] = self._build(averaged)
        return self._cache[averaged]

    def _build(self, averaged: bool) -> Pair:
        def kind(values):
            if values is None:
                return None, None
            return tuple(v / n for v, n in zip(values, self.counts)) if averaged else values

        (pc, pr), (rc, rr), (sc, sr) = kind(self.sums), kind(self.ref_sums), kind(self.scores)
        return Pair(pc, pr, rc, rr, sc, sr, self.policy)

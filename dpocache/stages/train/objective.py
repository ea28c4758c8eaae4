"""Stage two's objective: the preference loss of a micro-batch, plus the MoE router term, and its metrics.

Contract: :class:`Objective` is called with the policy's :class:`~dpocache.stages.train.forward.PolicyOutput`
and the batch's reference values and returns ``(loss, metrics)``: the scalar to back-propagate and a dict of
DETACHED 0-d tensors on the device (open-instruct's metric names), so that no micro-batch synchronises the
host with the device. Properties tell the held-out evaluation how the loss compares policy and reference.
"""

from __future__ import annotations

import torch

from dpocache.losses import AVERAGED, REFERENCE_FREE, LossOutput, SequenceLogps, preference_loss
from dpocache.stages.train.forward import PolicyOutput


def metric_tensors(out: LossOutput) -> dict[str, torch.Tensor]:
    """The seed's per-batch metrics as device tensors (averaged later over micro-batches)."""
    metrics = {
        "train_loss": out.losses.detach().mean(),
        "logps/chosen": out.chosen_logps.mean(),
        "logps/rejected": out.rejected_logps.mean(),
    }
    if out.chosen_rewards is not None:
        rc, rr = out.chosen_rewards, out.rejected_rewards
        metrics.update({
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/average": ((rc + rr) / 2).mean(),
            "rewards/accuracy": (rc > rr).float().mean(),
            "rewards/margin": (rc - rr).mean(),
        })
    return metrics


class Objective:
    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def reference_free(self) -> bool:
        return self.cfg.loss_type in REFERENCE_FREE

    @property
    def averaged(self) -> bool:
        return self.cfg.loss_type in AVERAGED

    @property
    def beta(self) -> float:
        return self.cfg.beta

    def __call__(self, policy: PolicyOutput, reference: SequenceLogps | None):
        cfg = self.cfg
        out = preference_loss(cfg.loss_type, policy.logps, reference, beta=cfg.beta,
                              label_smoothing=cfg.label_smoothing, gamma_beta_ratio=cfg.gamma_beta_ratio,
                              sft_weight=cfg.sft_weight)
        loss = out.losses.mean()
        metrics = metric_tensors(out)
        if policy.aux is not None:
            loss = loss + cfg.load_balancing_weight * policy.aux
            metrics["aux_loss"] = policy.aux.detach()
        return loss, metrics

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

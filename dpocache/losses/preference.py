"""The configured preference loss: :func:`build_loss` -> :class:`PreferenceLoss`, called once per micro-batch.

``PreferenceLoss(inputs) -> LossOutput``: the weighted sum of the configured losses (each a registered
function, :mod:`dpocache.losses.registry`), optionally WPO-weighted, plus the router loss; metrics as
detached 0-d tensors on the inputs' device (no host synchronisation: the training loop reduces them only
when it logs). ``requirements`` says what each batch must carry; :func:`check_requirements` refuses,
before any compute, a store that lacks what the loss needs.

State: ``bco_pair``'s running reward mean lives in buffers, so ``state_dict()``/``load_state_dict()`` give
an exact resume; it is updated only in training mode (``.eval()`` freezes it, for held-out evaluation).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dpocache.config import ConfigError
from dpocache.losses.config import LossConfig
from dpocache.losses.inputs import LossInputs, LossOutput, Requirements
from dpocache.losses.pair import Pair, Views

ZERO_LENGTH = ("a response with no trainable token (zero length) cannot be scored; such pairs must be dropped when "
               "the data is prepared")


def build_loss(cfg: LossConfig, *, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> "PreferenceLoss":
    """The loss of ``cfg``. ``reduce_mean`` averages a tensor across data-parallel processes (e.g.
    ``lambda t: accelerator.reduce(t, "mean")``); ``bco_pair``'s reward shift needs it when several
    processes train, so that every process keeps the same running mean."""
    return PreferenceLoss(cfg, reduce_mean=reduce_mean)


class PreferenceLoss(nn.Module):
    """Weighted sum of registered preference losses (see the module docstring)."""

    def __init__(self, cfg: LossConfig, *, reduce_mean=None):
        super().__init__()
        self.cfg = cfg
        self.reduce_mean = reduce_mean
        self.components = [(name, spec, weight) for (name, weight), spec in zip(cfg.components, cfg.specs())]
        self.register_buffer("bco_reward_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("bco_reward_updates", torch.zeros((), dtype=torch.int64))

    # -- what callers need to know ------------------------------------------------------------------
    @property
    def requirements(self) -> Requirements:
        return self.cfg.requirements

    @property
    def reference_free(self) -> bool:
        return self.cfg.reference_free

    @property
    def averaged(self) -> bool:
        """Rewards (and held-out margins) use per-token averaged log-probs (else sums)."""
        return self.cfg.averaged

    @property
    def beta(self) -> float:
        """The beta in effect (``--beta`` or the loss's default)."""
        return self.cfg.beta

    # -- computation --------------------------------------------------------------------------------
    def forward(self, inputs: LossInputs) -> LossOutput:
        self._check_inputs(inputs)
        device = inputs.policy.chosen_sum.device
        if self.bco_reward_mean.device != device:
            self.to(device)
        views = self._views(inputs)
        pair_weights = self._pair_weights(inputs) if self.cfg.use_weighting else None
        metrics: dict[str, torch.Tensor] = {}
        total = None
        for name, spec, weight in self.components:
            p = views.get(spec.averaged)
            losses = spec.fn(p, **self._arguments(spec, p))
            if pair_weights is not None:
                losses = losses * pair_weights
            metrics[f"loss/{name}"] = losses.detach().mean()
            total = weight * losses if total is None else total + weight * losses
        loss = total.mean()
        metrics = {**self._shared_metrics(views, total), **metrics}
        if self.cfg.load_balancing_loss:
            loss = loss + self.cfg.load_balancing_weight * inputs.aux_loss
            metrics["aux_loss"] = inputs.aux_loss.detach()
        return LossOutput(loss, total, metrics)

    def margins(self, inputs: LossInputs) -> torch.Tensor:
        """``[B]`` detached margins for held-out evaluation: the reward margin
        ``beta ((pi_c - ref_c) - (pi_r - ref_r))`` in the loss's kind of log-prob, or, reference-free (or no
        reference given), the policy's own log-prob margin ``pi_c - pi_r`` on per-token averages."""
        with torch.no_grad():
            if self.reference_free or inputs.reference is None:
                chosen, rejected = inputs.policy.pick(True)
                return chosen - rejected
            p = self._views(inputs).get(self.averaged)
            return self.beta * (p.chosen_logratio - p.rejected_logratio)

    def _views(self, inputs: LossInputs) -> Views:
        cfg = self.cfg
        return Views(inputs, ld_alpha=cfg.ld_alpha if cfg.ld_active else None,
                     f_divergence_type=cfg.f_divergence_type, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef)

    def _arguments(self, spec, p: Pair) -> dict:
        values = {"beta": self.cfg.beta}
        for name in spec.params:
            if name == "reward_shift":
                values[name] = self._reward_shift(p)
            elif name not in values:
                values[name] = getattr(self.cfg, name)
        return {name: values[name] for name in spec.params}

    def _reward_shift(self, p: Pair) -> torch.Tensor:
        """BCO's delta: the running mean of the batch-mean rewards, this batch included (training mode)."""
        if not self.cfg.bco_reward_shift:
            return torch.zeros((), dtype=p.chosen.dtype, device=p.chosen.device)
        if self.training:
            beta = self.cfg.beta
            batch = torch.cat([beta * p.chosen_logratio, beta * p.rejected_logratio]).detach().mean().double()
            if self.reduce_mean is not None:
                batch = self.reduce_mean(batch)
            self.bco_reward_updates += 1
            self.bco_reward_mean += (batch - self.bco_reward_mean) / self.bco_reward_updates
        return self.bco_reward_mean.to(p.chosen.dtype)

    def _pair_weights(self, inputs: LossInputs) -> torch.Tensor:
        """TRL's WPO weights (paper Eq. 2): ``exp(mean_t(log p_t - logsumexp_v 2 log p_v))`` of chosen times
        rejected, per pair, without gradient."""
        with torch.no_grad():
            policy = inputs.policy
            sq_chosen, sq_rejected = inputs.policy_log_sum_sq.masked_sums()
            chosen = (policy.chosen_sum - sq_chosen) / policy.chosen_count.clamp(min=1)
            rejected = (policy.rejected_sum - sq_rejected) / policy.rejected_count.clamp(min=1)
            return torch.exp(chosen) * torch.exp(rejected)

    def _shared_metrics(self, views: Views, total: torch.Tensor) -> dict[str, torch.Tensor]:
        """open-instruct's names: the loss, the policy log-probs and (with a reference) the rewards
        ``beta (pi - ref)``, in the kind of log-prob of :attr:`averaged`."""
        p = views.get(self.averaged)
        metrics = {"train_loss": total.detach().mean(), "logps/chosen": p.chosen.detach().mean(),
                   "logps/rejected": p.rejected.detach().mean()}
        if p.ref_chosen is not None and not self.reference_free:
            chosen = (self.beta * p.chosen_logratio).detach()
            rejected = (self.beta * p.rejected_logratio).detach()
            metrics.update({
                "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(),
                "rewards/average": ((chosen + rejected) / 2).mean(),
                "rewards/accuracy": (chosen > rejected).float().mean(),
                "rewards/margin": (chosen - rejected).mean(),
            })
        return metrics

    def _check_inputs(self, inputs: LossInputs) -> None:
        """What the configuration needs is present (Python checks), and no response is empty (on CPU a
        direct check; on an accelerator an asynchronous device assertion, so no host synchronisation)."""
        req, what = self.requirements, self.cfg.loss_type
        needed = [("reference", req.reference, inputs.reference, "reference sums and counts"),
                  ("reference_tokens", req.reference_tokens, inputs.reference_tokens,
                   "per-token reference log-probs (--ld_alpha)"),
                  ("policy_tokens", req.policy_tokens, inputs.policy_tokens, "per-token policy log-probs (--ld_alpha)"),
                  ("policy_log_sum_sq", req.policy_log_sum_sq, inputs.policy_log_sum_sq,
                   "the policy's per-token logsumexp(2 log p) (--use_weighting)"),
                  ("aux_loss", req.router_aux_loss, inputs.aux_loss, "the router loss (--load_balancing_loss)")]
        for field_name, wanted, value, text in needed:
            if wanted and value is None:
                raise ValueError(f"loss {what}: LossInputs.{field_name} is missing ({text})")
        counts = {"chosen": [inputs.policy.chosen_count], "rejected": [inputs.policy.rejected_count]}
        if req.reference:
            counts["chosen"].append(inputs.reference.chosen_count)
            counts["rejected"].append(inputs.reference.rejected_count)
        empty = {side: torch.stack([c <= 0 for c in values]).any(0) for side, values in counts.items()}
        if inputs.policy.chosen_count.device.type != "cpu":
            torch._assert_async(~(empty["chosen"] | empty["rejected"]).any(), ZERO_LENGTH)
            return
        for side, rows in empty.items():
            if rows.any():
                from dpocache.data.errors import DataError

                pairs = ", ".join(str(i) for i in rows.nonzero().flatten().tolist())
                raise DataError("training batch", f"pair(s) {pairs}", f"the {side} response has no trainable token: "
                                + ZERO_LENGTH)


def check_requirements(requirements: Requirements, *, store: str | None, store_token_logps: bool,
                       loss_type: str = "") -> None:
    """Refuse (ConfigError, before any compute) a store that cannot serve the loss.

    ``store``: the store path (None: no store); ``store_token_logps``: whether every example to train on
    has per-token reference log-probs (a store scored with ``--save_token_logps``).
    """
    name = f"loss {loss_type}" if loss_type else "the loss"
    if requirements.reference and store is None:
        raise ConfigError(f"{name} compares the policy with the reference: pass --store (a store written by "
                          "`dpocache score`); only reference-free losses (simpo, orpo, sft) train without one")
    if requirements.reference_tokens and not store_token_logps:
        raise ConfigError(f"--ld_alpha needs per-token reference log-probs, and the store {store} holds only sums: "
                          "run `dpocache score --save_token_logps` with the same reference model, data and --store "
                          "(it adds per-token values to the examples already scored), or drop --ld_alpha")


__all__ = ["PreferenceLoss", "build_loss", "check_requirements"]

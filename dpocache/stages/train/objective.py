"""Stage two's objective: the configured preference loss of a micro-batch (:mod:`dpocache.losses`).

Contract: :class:`Objective` wraps a :class:`~dpocache.losses.PreferenceLoss`: called with the policy's
:class:`~dpocache.stages.train.forward.PolicyOutput` and the batch, it returns ``(loss, metrics)``: the scalar
to back-propagate (the router term included) and a dict of DETACHED 0-d tensors on the device (open-instruct's
metric names, ``loss/<name>`` per component), so that no micro-batch synchronises the host with the device.
Its state (``bco_pair``'s running reward mean) goes into checkpoints; :meth:`margins` serves the held-out
evaluation without touching that state.
"""

from __future__ import annotations

import torch

from dpocache.losses import LossConfig, LossInputs, build_loss
from dpocache.stages.train.forward import PolicyOutput, loss_inputs


class Objective:
    def __init__(self, loss_cfg: LossConfig, *, reduce_mean=None):
        self.cfg = loss_cfg
        self.loss = build_loss(loss_cfg, reduce_mean=reduce_mean)
        self.requirements = self.loss.requirements

    @property
    def reference_free(self) -> bool:
        return self.loss.reference_free

    @property
    def averaged(self) -> bool:
        return self.loss.averaged

    @property
    def beta(self) -> float:
        return self.loss.beta

    def __call__(self, policy: PolicyOutput, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.loss.train()(loss_inputs(policy, batch, self.requirements))
        return out.loss, out.metrics

    def margins(self, inputs: LossInputs) -> torch.Tensor:
        """Held-out margins (the loss in eval mode: its running state is left as it is)."""
        return self.loss.eval().margins(inputs)

    def state_dict(self) -> dict:
        return {k: v.tolist() for k, v in self.loss.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            current = self.loss.state_dict()
            self.loss.load_state_dict({k: torch.tensor(v, dtype=current[k].dtype) for k, v in state.items()})

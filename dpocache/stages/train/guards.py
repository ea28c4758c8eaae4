"""What may stop a training run between two steps: a non-finite update, or a preemption signal.

Contract:
- :class:`FiniteGuard` keeps a non-finite loss or gradient norm from ever reaching the weights. With fused
  AdamW the check stays on the device (the optimizer's ``found_inf`` input skips the update, as PyTorch's
  GradScaler does), so no step waits for the host; other optimizers check on the host. The guard counts the
  skipped steps and remembers the first one's step and example hashes; :meth:`FiniteGuard.check` (called at
  logging steps, before checkpoints and before the final save: one host sync) raises
  :class:`NonFiniteError` once more than ``allowed`` steps were skipped.
- :class:`PreemptionAgreement` makes every rank stop at the same step boundary when any rank received
  SIGTERM/SIGUSR1: the flag of step k is all-reduced (MAX) on a CPU process group while step k + 1 runs,
  and read after it — no device synchronisation, one step of delay.
"""

from __future__ import annotations

import torch

from dpocache import preemption


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the message names the step and the examples."""


class FiniteGuard:
    def __init__(self, optimizer, device, *, allowed: int, on_device: bool):
        self.allowed = allowed
        self.on_device = on_device
        self._inner = _torch_optimizer(optimizer)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self._recent: dict[int, list[str]] = {}
        self.host_skipped = 0  # counted on the host (host-checked path) or at the last check (device path)

    def before_step(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None,
                    hashes: list[str]) -> bool:
        """Arm the optimizer for step ``step``; returns False when the host already knows it must skip it."""
        finite = torch.isfinite(loss_sum)
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        bad = (~finite).to(torch.int64)
        self._recent[step] = hashes
        self._skipped += bad
        self._first = torch.where((self._first == 0) & (bad > 0), torch.full_like(self._first, step), self._first)
        if self.on_device:
            self._inner.found_inf = bad.to(torch.float32)
            return True
        ok = bool(finite)  # host-checked path: one sync per step
        if not ok:
            self.host_skipped += 1
        return ok

    def after_step(self) -> None:
        if self.on_device:
            self._inner.found_inf = None

    def check(self, reduce_max=None) -> int:
        """Skipped steps so far (one host sync); raises NonFiniteError past the allowance. ``reduce_max`` (a
        cross-rank MAX of a tensor) makes every rank take the same decision."""
        counts = torch.stack([self._skipped, self._first])
        if reduce_max is not None:
            counts = reduce_max(counts)
        skipped, first = (int(v) for v in counts.tolist())
        self.host_skipped = skipped
        if skipped > self.allowed:
            hashes = self._recent.get(first, [])
            shown = ", ".join(h[:16] for h in hashes[:8]) + (" ..." if len(hashes) > 8 else "")
            raise NonFiniteError(
                f"step {first}: the loss or the gradient norm is not finite (NaN or inf); the update was not "
                f"applied and training stopped ({skipped} such step(s), {self.allowed} allowed by "
                f"--skip_nonfinite_steps). Examples of that step: {shown or 'unknown'}. Check the learning "
                "rate, beta and the store's reference values (`dpocache inspect STORE --verify`); the last "
                "checkpoint holds finite weights.")
        self._recent = {k: v for k, v in self._recent.items() if k == first}
        return skipped


def _torch_optimizer(optimizer):
    """The torch optimizer that really steps, under accelerate's wrapper (itself an Optimizer subclass)."""
    from accelerate.optimizer import AcceleratedOptimizer

    opt = optimizer
    while isinstance(opt, AcceleratedOptimizer) or (not isinstance(opt, torch.optim.Optimizer)
                                                   and hasattr(opt, "optimizer")):
        opt = opt.optimizer
    return opt


def fused_adamw(optimizer) -> bool:
    opt = _torch_optimizer(optimizer)
    return isinstance(opt, torch.optim.Optimizer) and bool(opt.defaults.get("fused"))


class PreemptionAgreement:
    """Agree across ranks on stopping at a step boundary (see the module docstring)."""

    def __init__(self, world: int):
        self._group = None
        self._pending = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        if world > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                self._group = dist.new_group(backend="gloo")

    def should_stop(self) -> bool:
        """Call once per step boundary on every rank; True on every rank at the same boundary."""
        if self._group is None:
            return preemption.requested()
        import torch.distributed as dist

        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._flag.item())
        if decided:
            preemption.mark_requested()
            return True
        self._flag = torch.tensor([int(preemption.requested())], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return False

    def close(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

"""Preemption: the SIGTERM / SIGUSR1 that Slurm and Kubernetes send before they kill, turned into a clean stop.

Contract: inside :func:`graceful_stop`, the first SIGTERM or SIGUSR1 only sets a flag (:func:`requested`).
The stages poll it at safe points: stage one after the chunk in flight is written, stage two at the next
optimizer-step boundary after writing a checkpoint. They then raise :class:`Preempted`, which the command
line turns into its message and exit code :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again"),
so a job script can requeue and rerun the same command (``--resume_from_checkpoint auto`` continues).
A second signal stops the process at once (the default action). Outside the context, and off the main
thread, signals keep their default behaviour.

Slurm: ``#SBATCH --signal=USR1@120`` (or ``B:USR1@120`` for the batch shell, which must forward it) sends
SIGUSR1 two minutes before the time limit; ``scancel`` and node preemption send SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

PREEMPTED_EXIT_CODE = 75
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

_state = {"signal": None}


class Preempted(Exception):
    """A stage stopped early on a preemption signal; the message says what was kept and how to go on."""


def requested() -> bool:
    """Has a preemption signal arrived inside :func:`graceful_stop`?"""
    return _state["signal"] is not None


def signal_name() -> str:
    """``SIGTERM`` / ``SIGUSR1`` (empty when none arrived): for the :class:`Preempted` message."""
    sig = _state["signal"]
    return signal.Signals(sig).name if sig is not None else ""


def _handler(signum, _frame) -> None:
    if _state["signal"] is not None:  # a second signal: stop now
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _state["signal"] = signum


@contextmanager
def graceful_stop(enabled: bool = True):
    """Catch SIGTERM/SIGUSR1 for the duration of the block (see the module docstring)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _state["signal"] = None
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["signal"] = None


def mark_requested(signum: int = signal.SIGTERM) -> None:
    """Record a preemption learnt another way (e.g. another rank received the signal)."""
    _state["signal"] = signum

"""The console: dpocache's one logger and its progress reports.

Contract:
- :func:`log` prints one plain line on standard output (looked up at each call, so redirection and
  test capture work). Under a multi-process launch only the main process (``RANK`` 0) prints info lines;
  the other ranks print warnings only, prefixed with their rank.
- :func:`progress` returns a tqdm bar when standard error is a terminal, and otherwise a reporter that
  writes a plain line at most every ``DPOCACHE_PROGRESS_SECONDS`` (30 s by default) and at the end, so
  log files hold a few readable lines instead of hundreds of carriage-return updates.
- :func:`quiet_libraries` keeps library chatter (transformers/datasets info, known harmless warnings)
  off the console; errors and the warnings that matter still come through.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

LOGGER_NAME = "dpocache"


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            if rank() != 0:
                if record.levelno < logging.WARNING:
                    return
                message = f"[rank {rank()}] {self.format(record)}"
            else:
                message = self.format(record)
            stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def get_logger() -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        handler = _Handler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def log(message: str) -> None:
    """One informational line (main process only)."""
    get_logger().info(message)


def warn(message: str) -> None:
    """A warning line (every process)."""
    get_logger().warning(f"warning: {message}")


def final_line(message: str) -> None:
    """A command's last word on standard error, written in one piece: the ranks of a multi-process launch
    share the stream, and ``print`` writes the text and its newline separately (lines would interleave)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """tqdm's small interface (update, set_postfix, write, close) as occasional plain log lines."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every: float | None = None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = every if every is not None else float(os.environ.get("DPOCACHE_PROGRESS_SECONDS", "30"))
        self._start = self._last = time.perf_counter()
        self._initial = self._reported = initial
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._report(now)

    def set_postfix(self, **kwargs) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _report(self, now: float) -> None:
        self._reported = self.n
        elapsed = now - self._start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        rate = (self.n - self._initial) / max(elapsed, 1e-9)
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            eta = f", eta {format_seconds((self.total - self.n) / rate)}"
        extra = f", {self._postfix}" if self._postfix else ""
        log(f"{self.desc}: {done} {self.unit} ({rate:.3g} {self.unit}/s, "
            f"{format_seconds(elapsed)} elapsed{eta}{extra})")

    def write(self, message: str) -> None:
        log(message)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._reported:  # the last line already said where it ended: not twice
                self._report(time.perf_counter())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(PlainProgress):
    def _report(self, now: float) -> None:
        pass

    def write(self, message: str) -> None:
        log(message)


def progress(total: int | None, desc: str, unit: str, *, enabled: bool = True, initial: int = 0):
    """A progress reporter: tqdm on a terminal, plain periodic lines otherwise, nothing when not ``enabled``
    (or not on the main process)."""
    if not enabled or rank() != 0:
        return _Silent(total, desc, unit, initial)
    if is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    return PlainProgress(total, desc, unit, initial)


def _drop_accelerator_note(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


def quiet_libraries() -> None:
    """Library output filtered to what matters (errors and real warnings)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not is_terminal():
            hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        if not is_terminal():
            datasets.disable_progress_bars()
    except ImportError:
        pass
    # vLLM logs dozens of INFO/WARNING lines per engine (config dumps, CPU tuning hints, one per batch): errors
    # only, unless the environment asks for more (VLLM_LOGGING_LEVEL=INFO); read when vLLM is imported.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\..*)?$")
    if not is_terminal():  # bars libraries draw with tqdm itself (e.g. GGUF conversion): no carriage returns in logs
        os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("accelerate", "torch.distributed", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # DeepSpeed resets its logger's level when imported (often by transformers, in runs that never use it);
    # a filter survives that, and drops its note that no GPU was found (dpocache names the device itself).
    logging.getLogger("DeepSpeed").addFilter(_drop_accelerator_note)
    for pattern in (".*torch.utils.checkpoint.*use_reentrant.*", ".*TypedStorage is deprecated.*",
                    ".*`torch_dtype` is deprecated.*", ".*Setting accelerator to CPU.*",
                    ".*None of the inputs have requires_grad=True.*"):
        warnings.filterwarnings("ignore", message=pattern)

"""PNG charts of a training run: ``OUTPUT_DIR/plots/*.png`` from ``metrics.jsonl`` (and ``summary.json``).

Contract: :func:`plot_metrics` writes one chart per panel of :data:`PANELS` whose metrics were logged
(loss, reward accuracy, reward margin, rewards, log-probs, learning rate) and returns their paths. Each
chart draws the logged values as a faint line and their exponential moving average (EMA) over it (the
learning rate, a schedule, is drawn as logged), labels both axes with units, keeps the legend outside the
plotting area, and names the run in its title (the tracker ``run_name`` when set, else the output
directory's name). The held-out figures of a ``run`` (``heldout_reward_accuracy``,
``heldout_reward_margin`` in ``summary.json``, or the ``summary`` passed in) are drawn as points at the
last training step. The log-prob chart says what the loss used: per-token averages (``dpo_norm``,
``simpo``, ``ipo``) or sums over the response (the other losses), read from the run's configuration
(``summary.json``, else the model card's). Files are replaced atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dpocache.config import ConfigError
from dpocache.losses import AVERAGED
from dpocache.stages.train.tracking import read_jsonl


@dataclass(frozen=True)
class Panel:
    name: str  # file stem
    keys: tuple[str, ...]  # metrics drawn
    title: str
    ylabel: str
    heldout: tuple[tuple[str, str], ...] = ()  # (summary key, legend label) drawn as points
    smooth: bool = True  # False: a schedule, drawn as logged


PANELS = (
    Panel("loss", ("train_loss",), "training loss", "loss (nats)"),
    Panel("rewards_accuracy", ("rewards/accuracy",), "reward accuracy",
          "pairs with reward chosen > rejected (fraction)",
          (("heldout_reward_accuracy", "held-out reward accuracy"),)),
    Panel("rewards_margin", ("rewards/margin",), "reward margin",
          "reward chosen - rejected (beta x nats)", (("heldout_reward_margin", "held-out reward margin"),)),
    Panel("rewards", ("rewards/chosen", "rewards/rejected"), "rewards (beta x log-ratio to the reference)",
          "reward (beta x nats)"),
    Panel("logps", ("logps/chosen", "logps/rejected"), "policy log-probs", "log-prob (nats)"),
    Panel("learning_rate", ("learning_rate",), "learning rate", "learning rate (AdamW peak x schedule)",
          smooth=False),
)

RAW_ALPHA = 0.3
HELDOUT_COLOR = "#d62728"  # red: not one of the series colours (blue, orange)


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, bias-corrected as TensorBoard's smoothing
    is (the first points are not pulled towards an arbitrary start value)."""
    alpha = 2.0 / (span + 1)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(acc / weight)
    return out


def ema_span(points: int) -> int:
    """About a tenth of the logged points (1 to 50): short runs stay nearly raw, long runs get smooth."""
    return max(1, min(50, points // 10))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_config(output_dir: Path) -> dict:
    """The training configuration the model card (README.md) records in its YAML block, or {}."""
    import yaml

    try:
        text = (output_dir / "README.md").read_text()
    except OSError:
        return {}
    rest = text.partition("## Training configuration")[2]
    block = rest.split("```yaml", 1)[-1].split("```", 1)[0] if rest else ""
    try:
        data = yaml.safe_load(block) if block.strip() else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class RunInfo:
    name: str
    loss_type: str | None
    summary: dict


def run_info(output_dir: Path, summary: dict | None = None) -> RunInfo:
    """Run name, loss type and summary of ``output_dir`` (``summary`` wins over ``summary.json``)."""
    summary = summary if summary is not None else _read_json(output_dir / "summary.json")
    config = summary.get("config") or _card_config(output_dir)
    name = config.get("run_name") or output_dir.resolve().name
    loss_type = config.get("loss_type")
    return RunInfo(str(name), str(loss_type) if loss_type else None, summary)


def logps_label(loss_type: str | None) -> tuple[str, str]:
    """(title, y label) of the log-prob chart: what the loss used."""
    if loss_type is None:
        return ("policy log-probs (as the loss uses them)",
                "log-prob (nats; per-token mean for dpo_norm/simpo/ipo, sum otherwise)")
    if loss_type in AVERAGED:
        return f"policy log-probs, per-token mean ({loss_type})", "mean log-prob per trainable token (nats)"
    return f"policy log-probs, sum over the response ({loss_type})", "log-prob summed over trainable tokens (nats)"


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r.get("training_step"), r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw_panel(plt, panel: Panel, rows: list[dict], info: RunInfo, last_step):
    present = [k for k in panel.keys if _series(rows, k)[0]]
    if not present:
        return None
    title, ylabel = logps_label(info.loss_type) if panel.name == "logps" else (panel.title, panel.ylabel)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(present):
        steps, values = _series(rows, key)
        span = ema_span(len(values)) if panel.smooth else 1
        color = colors[i % len(colors)]
        if span > 1:
            ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=1, label=f"{key} (logged)")
            ax.plot(steps, ema(values, span), color=color, linewidth=2, label=f"{key} (EMA, span {span})")
        else:
            ax.plot(steps, values, color=color, linewidth=2, marker="o" if len(values) < 30 else None,
                    markersize=3, label=f"{key} (logged)")
    for key, label in panel.heldout:
        value = info.summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and last_step is not None:
            pairs = info.summary.get("heldout_examples")
            ax.plot([last_step], [value], linestyle="none", marker="*", markersize=14, color=HELDOUT_COLOR,
                    label=f"{label}: {value:.3g}" + (f" ({pairs} pairs)" if pairs else ""), zorder=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{info.name}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def plot_metrics(output_dir: str | Path, *, summary: dict | None = None) -> list[Path]:
    """Write one PNG per panel into ``output_dir/plots`` and return their paths.

    ``summary``: the run's summary (held-out figures, configuration) when ``summary.json`` is not written
    yet; by default ``output_dir/summary.json`` is read when present.
    """
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'dpocache[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics.jsonl in {output_dir}: not a training output directory "
                          "(`dpocache train`/`run` write it there)")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"{path} holds no logged steps")
    info = run_info(output_dir, summary)
    steps = [r.get("training_step") for r in rows if isinstance(r.get("training_step"), int)]
    last_step = info.summary.get("train_steps") or (max(steps) if steps else None)
    out_dir = output_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        fig = _draw_panel(plt, panel, rows, info, last_step)
        if fig is None:
            continue
        target = out_dir / f"{panel.name}.png"
        tmp = target.with_name(f".{target.name}.tmp.png")
        fig.savefig(tmp, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(target)
        written.append(target)
    return written

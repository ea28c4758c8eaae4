"""PNG charts of a training run's ``metrics.jsonl`` (loss, rewards, log-probs, learning rate)."""

from __future__ import annotations

from pathlib import Path

from dpocache.config import ConfigError
from dpocache.stages.train.tracking import read_jsonl

PANELS = (
    ("loss", ("train_loss",)),
    ("rewards_accuracy", ("rewards/accuracy",)),
    ("rewards_margin", ("rewards/margin",)),
    ("rewards", ("rewards/chosen", "rewards/rejected")),
    ("logps", ("logps/chosen", "logps/rejected")),
    ("learning_rate", ("learning_rate",)),
)


def plot_metrics(output_dir: str | Path) -> list[Path]:
    """Write one PNG per panel into ``output_dir/plots`` and return their paths."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'dpocache[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics.jsonl in {output_dir}")
    rows = read_jsonl(path)
    if not rows:
        raise ConfigError(f"{path} holds no logged steps")
    steps = [r.get("training_step") for r in rows]
    out_dir = Path(output_dir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PANELS:
        present = [k for k in keys if any(r.get(k) is not None for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key in present:
            pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1.5)
        ax.set_xlabel("training_step")
        ax.set_title(", ".join(present))
        ax.grid(alpha=0.3)
        if len(present) > 1:
            ax.legend()
        fig.tight_layout()
        target = out_dir / f"{name}.png"
        tmp = target.with_name(f".{target.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(target)
        written.append(target)
    return written

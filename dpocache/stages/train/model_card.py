"""The README.md model card saved next to a trained model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from dpocache import __version__
from dpocache.files import atomic_write_text


def write_model_card(out_dir: str | Path, *, base_model: str, train_cfg, loss_cfg, store_root: str | Path | None,
                     store_identity: dict | None, list_name: str, examples: int, final_metrics: dict,
                     heldout_metrics: dict | None = None) -> Path:
    """Write ``README.md``: training and loss configuration, reference store identity (when there is one), final
    metrics and the held-out evaluation (when there was one)."""
    out = Path(out_dir)
    config = {**dataclasses.asdict(train_cfg), **dataclasses.asdict(loss_cfg)}
    front = {"library_name": "transformers", "tags": ["dpo", "dpocache"]}
    if not Path(str(base_model)).expanduser().exists():  # Hub metadata names a Hub model, never a local directory
        front["base_model"] = str(base_model)
    if store_root is None:
        source = f"example list `{list_name}`, tokenized from the training data: the loss is reference-free"
        provenance = ["## Reference", "", "None: no reference model and no reference store were used.", ""]
    else:
        source = f"example list `{list_name}` of the reference store"
        provenance = ["## Reference store identity", "", f"Store: `{Path(store_root).name}`", "", "```json",
                      json.dumps(store_identity, indent=2, sort_keys=True), "```", ""]
    text = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {out.resolve().name}", "",
        f"Trained with dpocache {__version__} from `{base_model}` with the `{loss_cfg.loss_type}` "
        f"preference loss on {examples} pairs ({source}).", "",
        "## Final metrics", "", "| metric | value |", "| --- | --- |",
        *[f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in final_metrics.items()],
        "", *_heldout_section(heldout_metrics or {}), *provenance,
        "## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", "",
    ]
    path = out / "README.md"
    atomic_write_text(path, "\n".join(text))
    return path


def _heldout_section(metrics: dict) -> list[str]:
    if not metrics:
        return []
    rows = [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in metrics.items()]
    return ["## Held-out evaluation", "", "| metric | value |", "| --- | --- |", *rows, ""]

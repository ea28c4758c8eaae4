"""Configuration of the data layer (sources, mixture, template, masking, bad-input policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpocache.config import ConfigError, check, opt
from dpocache.data.mixer import parse_amount


@dataclass
class DataConfig:
    dataset: str | None = opt(None, "One source (file, save_to_disk folder or hub name); shorthand for "
                              "--mixer_list SRC 1.0.", group="data")
    mixer_list: list[str] = opt(factory=list, help="Mixture: SRC AMOUNT pairs; an amount with a decimal point "
                                "is a fraction of the source (> 1.0 upsamples), an integer a row count.",
                                group="data")
    mixer_list_splits: list[str] = opt(factory=lambda: ["train"], help="Split(s) to read: one for all sources "
                                       "or one per source.", group="data")
    dataset_format: Literal["auto", "conversational", "prompt", "hh"] = opt(
        "auto", "Row format, detected per source by default.", group="data")
    chat_template_name: str | None = opt(
        None, "Built-in chat template (tulu, olmo, chatml) instead of the tokenizer's own.", group="data")
    add_bos: bool = opt(False, "Prepend the BOS token when the template does not.", group="data")
    mask_mode: Literal["all_assistant", "final_turn"] = opt(
        "all_assistant", "Trainable tokens: every assistant turn (default) or only the final one.", group="data")
    max_seq_length: int | None = opt(None, "Right-truncate chosen and rejected to this many tokens "
                                     "(None: no truncation).", group="data")
    max_train_samples: int | None = opt(None, "Cap the mixture at this many examples.", group="data")
    on_bad_row: Literal["error", "skip"] = opt("error", "Stop at the first bad row (error) or skip bad rows "
                                               "and report a count per defect (skip).", group="data")
    seed: int = opt(42, "Seed of data order, sampling and initialisation.", group="data")
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer (default: the model's).", group="data")
    dataset_cache_dir: str | None = opt(None, "Cache of tokenized data (and of hub downloads); default: "
                                        "$DPOCACHE_HOME/tokenized.", group="data")

    def __post_init__(self):
        check(not (self.dataset and self.mixer_list), "give --dataset or --mixer_list, not both")
        check(self.dataset is None or self.dataset.strip() != "", "dataset: empty source name")
        check(len(self.mixer_list) % 2 == 0, "mixer_list: expected SRC AMOUNT pairs, got an odd number of values")
        for amount in self.mixer_list[1::2]:
            try:
                parse_amount(amount)
            except ValueError as exc:
                raise ConfigError(f"mixer_list: {exc}") from None
        n_src = len(self.mixer_list) // 2
        check(len(self.mixer_list_splits) in (1, max(n_src, 1)),
              f"mixer_list_splits: give one split or one per source ({n_src})")
        check(self.max_seq_length is None or self.max_seq_length >= 2, "max_seq_length must be >= 2")
        check(self.max_train_samples is None or self.max_train_samples >= 1, "max_train_samples must be >= 1")

    def mixture(self) -> list[str]:
        """The effective mixer list (``--dataset D`` is ``--mixer_list D 1.0``)."""
        return list(self.mixer_list) if self.mixer_list else ([self.dataset, "1.0"] if self.dataset else [])

    def sources(self) -> list[tuple[str, str, str]]:
        """(source, amount, split) triples."""
        mix = self.mixture()
        pairs = list(zip(mix[0::2], mix[1::2]))
        splits = self.mixer_list_splits * len(pairs) if len(self.mixer_list_splits) == 1 else self.mixer_list_splits
        return [(src, amount, split) for (src, amount), split in zip(pairs, splits)]

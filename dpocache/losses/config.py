"""The loss options (``--loss_type``, ``--beta``, ...): one typed, validated dataclass.

Every field is a flag and a YAML key (:func:`dpocache.config.opt`). ``--loss_type`` takes one name or a
comma-separated list (a YAML list works too) and ``--loss_weights`` the matching weights. ``--beta``
left out takes the first loss's own default (:func:`dpocache.losses.registry.default_beta`), resolved
here so that ``--dry_run`` and the start-up banner show the value in effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from dpocache.config import ConfigError, check, opt
from dpocache.losses.inputs import Requirements
from dpocache.losses.registry import LossSpec, default_beta, resolve

_FLOATS = ("beta", "label_smoothing", "gamma_beta_ratio", "sft_weight", "ld_alpha", "f_alpha_divergence_coef",
           "discopop_tau", "load_balancing_weight")


def _items(text: str) -> list[str]:
    """``a,b``, ``a, b`` or a YAML list's text ``['a', 'b']`` -> ``['a', 'b']``."""
    text = str(text).strip()
    if text[:1] in "[(" and text[-1:] in "])":
        text = text[1:-1]
    return [part.strip().strip("'\"").strip() for part in text.split(",") if part.strip()]


@dataclass
class LossConfig:
    loss_type: str = opt(
        "dpo_norm", "Preference loss, or a comma-separated combination weighted by --loss_weights (MPO: "
        "sigmoid,bco_pair,sft). One of: dpo (= sigmoid), dpo_norm (= sigmoid_norm), simpo, wpo, ipo, hinge, robust, "
        "exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, orpo, "
        "kto_pair; formulas and defaults in docs/losses.md.", group="loss")
    loss_weights: str | None = opt(None, "Comma-separated weights of the --loss_type combination, one per loss "
                                   "(MPO: 0.8,0.2,1.0; default: 1 each).", group="loss")
    beta: float | None = opt(None, "Temperature of the preference loss. Not given: the (first) loss's own default: "
                             "dpo/sigmoid 0.1, dpo_norm 5.0 (open-instruct's Tulu 3 recipe), sigmoid_norm 0.1 (TRL), "
                             "simpo 2.0 (SimPO paper), every other loss 0.1 (TRL's default).", group="loss")
    label_smoothing: float = opt(0.0, "Label smoothing in [0, 0.5): conservative dpo/dpo_norm/simpo/wpo/aot, robust's "
                                 "label-flip rate (paper: 0.1), exo_pair's epsilon (must be > 0; paper: 1e-3).",
                                 group="loss")
    gamma_beta_ratio: float = opt(0.3, "SimPO target margin over beta (gamma / beta).", group="loss")
    sft_weight: float = opt(0.0, "Add the sft loss (chosen negative log-likelihood per token) with this weight.",
                            group="loss")
    ld_alpha: float | None = opt(None, "LD-DPO: weight in [0, 1] of the log-probs of the tokens beyond the shorter "
                                 "response's length, for policy and reference (1: no effect). Needs per-token "
                                 "reference log-probs: a store scored with --save_token_logps.", group="loss")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = opt(
        "reverse_kl", "f-DPO: divergence regulariser of the log-ratios (dpo, dpo_norm, ipo, hinge, robust, exo_pair, "
        "discopop, sft only).", group="loss")
    f_alpha_divergence_coef: float = opt(0.5, "alpha of --f_divergence_type alpha_divergence (1: reverse KL).",
                                         group="loss")
    use_weighting: bool = opt(False, "WPO weights as TRL: multiply each pair's loss by exp(mean over tokens of "
                              "log p - logsumexp(2 log p)) of chosen times rejected (not with aot, aot_unpaired).",
                              group="loss")
    discopop_tau: float = opt(0.05, "Temperature of discopop's log-ratio modulation (paper: 0.05).", group="loss")
    bco_reward_shift: bool = opt(True, "bco_pair subtracts the running mean of the rewards (the BCO paper's reward "
                                 "shift, kept in checkpoints); false: no shift, as TRL 1.16's bco_pair.",
                                 group="loss")
    load_balancing_loss: bool = opt(False, "Add the MoE router load-balancing loss (e.g. OLMoE); logs aux_loss.",
                                    group="loss")
    load_balancing_weight: float = opt(0.001, "Weight of the load-balancing loss.", group="loss")

    def __post_init__(self):
        names = _items(self.loss_type)
        check(bool(names), "loss_type: give at least one loss name")
        specs = []
        for name in names:
            try:
                specs.append(resolve(name))
            except ValueError as exc:
                raise ConfigError(f"loss_type: {exc}") from None
        canonical = [s.name for s in specs]
        dups = sorted({n for n in canonical if canonical.count(n) > 1})
        check(not dups, f"loss_type: {', '.join(dups)} given twice (aliases name the same loss)")
        self.loss_type = ",".join(names)
        self._check_floats()
        if self.loss_weights is not None:
            weights = self._parse_weights(self.loss_weights, len(names))
            self.loss_weights = ",".join(repr(w) for w in weights)
        check(self.sft_weight >= 0, "sft_weight must be >= 0")
        check(not (self.sft_weight > 0 and "sft" in canonical),
              "sft_weight: sft is already in --loss_type; give its weight in --loss_weights instead")
        self._beta_default = self.beta is None
        if self.beta is None:
            self.beta = default_beta(names[0])
        check(self.beta > 0, "beta must be > 0")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        check("exo_pair" not in canonical or self.label_smoothing > 0,
              "exo_pair needs --label_smoothing > 0 (its epsilon; the EXO paper recommends 1e-3)")
        check(self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, "ld_alpha must be in [0, 1]")
        self._check_compatible(self.specs())
        check(self.discopop_tau > 0, "discopop_tau must be > 0")
        check(self.load_balancing_weight >= 0, "load_balancing_weight must be >= 0")

    def _check_floats(self) -> None:
        for name in _FLOATS:
            value = getattr(self, name)
            check(value is None or math.isfinite(value), f"{name} must be a finite number, got {value}")

    @staticmethod
    def _parse_weights(text: str, count: int) -> list[float]:
        items = _items(text)
        try:
            weights = [float(w) for w in items]
        except ValueError:
            raise ConfigError(f"loss_weights: expected comma-separated numbers, got {text!r}") from None
        check(len(weights) == count, f"loss_weights: {len(weights)} weight(s) for {count} loss(es) in --loss_type")
        check(all(math.isfinite(w) and w >= 0 for w in weights),
              f"loss_weights: every weight must be a finite number >= 0, got {text!r}")
        check(any(w > 0 for w in weights), "loss_weights: at least one weight must be > 0")
        return weights

    def _check_compatible(self, specs: list[LossSpec]) -> None:
        if self.f_divergence_type != "reverse_kl":
            bad = [s.name for s in specs if not s.f_divergence]
            check(not bad, f"f_divergence_type {self.f_divergence_type}: not defined for {', '.join(bad)} (only for "
                  "losses on the chosen-minus-rejected margin: dpo, dpo_norm, ipo, hinge, robust, exo_pair, "
                  "discopop, sft)")
        if self.use_weighting:
            bad = [s.name for s in specs if not s.weighting]
            check(not bad, f"use_weighting: not defined for {', '.join(bad)} (they sort the batch, which would "
                  "misalign per-pair weights)")

    # -- what the configuration resolves to ----------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """The losses as given (aliases kept: they name the ``loss/<name>`` metrics)."""
        return tuple(_items(self.loss_type))

    @property
    def components(self) -> list[tuple[str, float]]:
        """(name, weight) of every loss that is summed, ``--sft_weight``'s ``sft`` included."""
        if self.loss_weights is None:
            weights = [1.0] * len(self.names)
        else:
            weights = [float(w) for w in _items(self.loss_weights)]
        out = list(zip(self.names, weights))
        if self.sft_weight > 0:
            out.append(("sft", self.sft_weight))
        return out

    def specs(self) -> list[LossSpec]:
        return [resolve(name) for name, _ in self.components]

    @property
    def reference_free(self) -> bool:
        """No loss compares with the reference: training needs no store and stage one is skipped."""
        return not any(s.reference for s in self.specs())

    @property
    def averaged(self) -> bool:
        """Whether rewards and logps metrics use per-token averages: the first reference-based loss's kind
        (the first loss's when reference-free)."""
        specs = self.specs()
        return next((s for s in specs if s.reference), specs[0]).averaged

    @property
    def beta_is_default(self) -> bool:
        return getattr(self, "_beta_default", False)

    @property
    def ld_active(self) -> bool:
        return self.ld_alpha is not None and self.ld_alpha != 1.0

    @property
    def requirements(self) -> Requirements:
        reference = not self.reference_free
        return Requirements(reference=reference, reference_tokens=self.ld_active and reference,
                            policy_tokens=self.ld_active, policy_log_sum_sq=self.use_weighting,
                            router_aux_loss=self.load_balancing_loss)

    def describe(self) -> str:
        """One line for the start-up banner: the losses, their weights and the beta in effect."""
        parts = self.components
        text = " + ".join(f"{w:g} * {n}" if len(parts) > 1 or w != 1 else n for n, w in parts)
        source = f" ({self.names[0]}'s default; --beta sets it)" if self.beta_is_default else ""
        extras = [f"label_smoothing {self.label_smoothing:g}"] if self.label_smoothing else []
        extras += [f"ld_alpha {self.ld_alpha:g}"] if self.ld_active else []
        extras += [f"f_divergence {self.f_divergence_type}"] if self.f_divergence_type != "reverse_kl" else []
        extras += ["WPO weighting"] if self.use_weighting else []
        return f"loss {text}, beta {self.beta:g}{source}" + "".join(f", {e}" for e in extras)

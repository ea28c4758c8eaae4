"""Preference losses: a registry of documented loss functions and the configured, weighted loss.

- :mod:`~dpocache.losses.inputs`: what a loss reads (:class:`LossInputs`) and returns (:class:`LossOutput`).
- :mod:`~dpocache.losses.registry`: one function per formula, registered by name (and TRL aliases).
- :mod:`~dpocache.losses.pairwise`, :mod:`~dpocache.losses.pointwise`, :mod:`~dpocache.losses.reference_free`:
  the loss functions (paper, formula, shapes in each docstring; docs/losses.md lists them all).
- :mod:`~dpocache.losses.config`: :class:`LossConfig`, the ``--loss_type``/``--beta``/... options.
- :mod:`~dpocache.losses.preference`: :func:`build_loss` -> :class:`PreferenceLoss`, :func:`check_requirements`.
"""

from dpocache.losses import pairwise, pointwise, reference_free  # noqa: F401  (registers every loss)
from dpocache.losses.config import LossConfig
from dpocache.losses.inputs import LossInputs, LossOutput, PairTokens, Requirements, SequenceLogps
from dpocache.losses.pair import F_DIVERGENCES, Pair
from dpocache.losses.preference import PreferenceLoss, build_loss, check_requirements
from dpocache.losses.registry import LOSSES, LossSpec, all_names, default_beta, resolve

# Names of the single losses that need no reference / read per-token averages (aliases included).
REFERENCE_FREE: frozenset[str] = frozenset(n for n in all_names() if not resolve(n).reference)
AVERAGED: frozenset[str] = frozenset(n for n in all_names() if resolve(n).averaged)

__all__ = ["AVERAGED", "F_DIVERGENCES", "LOSSES", "REFERENCE_FREE", "LossConfig", "LossInputs", "LossOutput",
           "LossSpec", "Pair", "PairTokens", "PreferenceLoss", "Requirements", "SequenceLogps", "all_names",
           "build_loss", "check_requirements", "default_beta", "resolve"]

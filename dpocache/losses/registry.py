"""The registry of preference losses: one documented function per formula, registered by name.

A loss function takes a :class:`~dpocache.losses.pair.Pair` (the ``[B]`` log-probs of one batch, as the
loss wants them: sums or per-token averages) plus keyword-only hyper-parameters named as the options
that set them (``beta``, ``label_smoothing``, ...), and returns ``[B]`` per-example losses. The keyword
names are read from the signature, so a function declares exactly the options it uses.

Register with::

    @register("dpo", aliases={"sigmoid": 0.1}, beta=0.1, paper="https://arxiv.org/abs/2305.18290")
    def dpo(p: Pair, *, beta: float, label_smoothing: float) -> torch.Tensor: ...

An alias is another name for the same formula (TRL's ``sigmoid`` is ``dpo``), with its own default beta
(the default of the framework that uses that name).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what it needs."""

    name: str
    fn: Callable
    paper: str
    default_beta: float
    averaged: bool = False  # reads per-token AVERAGED log-probs (else sums)
    reference: bool = True  # needs the reference (False: reference-free)
    f_divergence: bool = False  # accepts --f_divergence_type other than reverse_kl
    weighting: bool = True  # accepts --use_weighting (WPO weights per pair)
    aliases: dict = field(default_factory=dict)  # alias name -> its default beta
    params: tuple = ()  # keyword-only parameters of ``fn``

    @property
    def summary(self) -> str:
        """First line of the function's docstring."""
        return (inspect.getdoc(self.fn) or "").splitlines()[0]


LOSSES: dict[str, LossSpec] = {}  # canonical name -> spec
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register(name: str, *, paper: str, beta: float, averaged: bool = False, reference: bool = True,
             f_divergence: bool = False, weighting: bool = True, aliases: dict | None = None):
    """Register the decorated function as the loss ``name`` (and its ``aliases``)."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        params = tuple(p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
        spec = LossSpec(name, fn, paper, beta, averaged, reference, f_divergence, weighting, dict(aliases or {}),
                        params)
        for key in (name, *spec.aliases):
            if key in LOSSES or key in _ALIASES:
                raise ValueError(f"loss name {key!r} registered twice")
        LOSSES[name] = spec
        _ALIASES.update({alias: name for alias in spec.aliases})
        return fn

    return wrap


def all_names() -> list[str]:
    """Every accepted ``--loss_type`` name (canonical names and aliases), sorted."""
    return sorted([*LOSSES, *_ALIASES])


def resolve(name: str) -> LossSpec:
    """The spec of ``name`` (a canonical name or an alias); ValueError with a did-you-mean otherwise."""
    canonical = _ALIASES.get(name, name)
    if canonical in LOSSES:
        return LOSSES[canonical]
    close = difflib.get_close_matches(name, all_names(), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown loss {name!r}; {hint}known: {', '.join(all_names())}")


def default_beta(name: str) -> float:
    """The beta ``name`` uses when ``--beta`` is not given (an alias keeps its own framework's default)."""
    spec = resolve(name)
    return spec.aliases.get(name, spec.default_beta)

"""Stage two: train the policy against reference values streamed from a store (only the policy is loaded).

Modules: ``config`` (TrainConfig), ``recipe`` (setup in small steps, the loop, evaluation), ``examples`` (where
examples come from), ``source`` / ``store_index`` (the streaming source and its per-example index),
``loader`` (plan, collation into pinned tensors, prefetching), ``forward`` (the concatenated forward),
``objective`` (loss and metrics), ``guards`` (non-finite updates, preemption), ``engine`` (accelerate
preparation, the log-prob path), ``distributed`` (engines), ``checkpoint`` / ``optim_state`` / ``outputs``
(what goes to disk), ``evaluate`` (held-out), ``tracking`` (metrics), ``batching`` (epoch order), ``packing``,
``extras`` (LoRA, Liger, dropout, compile, ...), ``model_card``.
"""

from dpocache.stages.train.config import TrainConfig
from dpocache.stages.train.recipe import Recipe, run_train

__all__ = ["Recipe", "TrainConfig", "run_train"]

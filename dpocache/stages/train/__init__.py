"""Stage two: train the policy against reference values streamed from a store (only the policy is loaded).

Modules: ``config`` (TrainConfig), ``recipe`` (setup, the loop, save), ``examples`` (where examples come
from, batching them through the policy, held-out evaluation), ``distributed`` (engines), ``checkpoint``,
``tracking`` (metrics), ``batching`` (epoch order), ``packing``, ``extras`` (LoRA, Liger, dropout, ...),
``model_card``.
"""

from dpocache.stages.train.config import TrainConfig
from dpocache.stages.train.examples import evaluate, load_examples
from dpocache.stages.train.recipe import TrainState, run_train, save, setup, train

__all__ = ["TrainConfig", "TrainState", "evaluate", "load_examples", "run_train", "save", "setup", "train"]

"""dpocache: DPO training as two stages that meet in a persisted, content-addressed reference store."""

__version__ = "0.1.0"

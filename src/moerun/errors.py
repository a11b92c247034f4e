"""Errors shared across layers: defined at the bottom so that any layer may raise them."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the problem."""


class MemoryBudgetError(CheckpointError):
    """A memory budget that cannot be read, or that cannot hold what it must (one layer's selected experts,
    every expert at its cheapest format); the message says which and what the least is. A CheckpointError, so
    that ``moerun.load`` raises one kind of error for whatever keeps a model from loading."""

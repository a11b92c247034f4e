"""Errors shared across layers: defined at the bottom so that any layer may raise them."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and the problem."""

"""Errors raised while loading and cutting models into stages."""


class StageError(Exception):
    """Base class for errors in tandem.stages."""


class UnsupportedModelError(StageError):
    """The model's architecture has no stage adapter."""


class LayoutError(StageError):
    """A stage layout does not fit the model (e.g. more client blocks than the model has)."""


class ModelLoadError(StageError):
    """A model directory or the default model could not be loaded."""

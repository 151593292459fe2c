"""Errors raised while selecting, distilling, packaging and loading emulators."""


class EmulatorError(Exception):
    """Base class for errors in tandem.emulator; messages say what to do."""


class SelectionError(EmulatorError):
    """--drop-ratio / --keep do not fit the model's middle blocks."""


class TextError(EmulatorError):
    """The public distillation text is missing, empty or unreadable."""


class PackageError(EmulatorError):
    """An emulator package is incomplete, corrupt (hash mismatch) or does not fit its manifest."""

"""The one error type for mistakes in what the user gave lidiff: configs, flags, files, data.

Raised where the problem is found, with a message that names the config field or file and says what to do.
The entry points (``train.py``, ``sample.py``, ``python -m lidiff.*``) catch ``UserError`` once and print the
message alone on stderr, exit status 1; every other exception is a lidiff bug and keeps its traceback. The
subclasses also derive from the matching built-in exception, so library callers can catch those as usual.
"""


class UserError(Exception):
    """A problem with the user's input, not with lidiff; its message is all the user needs to see."""


class ConfigError(UserError, ValueError):
    """A config field or flag has a value lidiff cannot use."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, directory or checkpoint the user pointed at (or must provide) does not exist."""


class DataError(UserError, RuntimeError):
    """The data cannot be read (no readable images, unreadable files beyond the allowed fraction)."""


class TrainingDiverged(UserError, FloatingPointError):
    """Training produced NaN/inf; nothing non-finite was saved, the last good checkpoint is kept."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are untouched."""

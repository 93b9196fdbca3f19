"""What every lidiff command shares at start-up: quiet logs, and user mistakes as a message, not a traceback.

``run(main)`` is ``absl.app.run(main)`` except that a ``lidiff.errors.UserError`` raised anywhere below ``main``
ends the program with its message on stderr and exit status 1. Set ``LIDIFF_DEBUG=1`` to see the traceback
of a user error too. Any other exception is a lidiff bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import sys
from typing import Callable

from absl import app, logging

from lidiff.errors import UserError

# Lines a CPU or GPU user cannot act on: JAX probing for TPU/other backends it will not use.
_NOISY_LOGGERS = ("jax._src.xla_bridge",)


def _keep_record(record: std_logging.LogRecord) -> bool:
    """Drops orbax's INFO lines, and the tracebacks its background save threads log when a write fails: the same
    failure is raised again in the main thread, where ``lidiff.checkpoint`` reports it once."""
    if "orbax" not in record.pathname:
        return True
    if record.levelno < std_logging.WARNING or "Metadata file does not exist" in record.getMessage():
        return False  # (the second: orbax asks for a file that lidiff's checkpoints do not need)
    return record.threadName == "MainThread" and not record.exc_info


def _drop_closed_event_loop_noise(unraisable) -> None:
    """orbax's background threads can report ``RuntimeError('Event loop is closed')`` while Python cleans up after
    a failed restore (one line per pending future); the failure itself is reported where it happened."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
        return
    sys.__unraisablehook__(unraisable)


def quiet_logs() -> None:
    """INFO logging for lidiff, without the backend-probing lines of JAX, orbax's per-save INFO lines, or the
    event-loop noise orbax leaves behind after a failed restore."""
    sys.unraisablehook = _drop_closed_event_loop_noise
    # Only orbax uses asyncio here; its "Task exception was never retrieved" lines repeat a failed write that is
    # raised (and reported) in the main thread.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    logging.set_verbosity(logging.INFO)
    for name in _NOISY_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
    std_logging.getLogger("absl").addFilter(_keep_record)


def exit_with_message(message: str) -> None:
    """Writes ``error: <message>`` to stderr and exits with status 1."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` with ``UserError`` turned into its message and exit status 1 (unless ``LIDIFF_DEBUG=1``)."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except UserError as e:
            if os.environ.get("LIDIFF_DEBUG"):
                raise
            exit_with_message(str(e))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or os.environ.get("LIDIFF_DEBUG"):
                raise
            exit_with_message(f"no space left on device while writing {e.filename or 'logs'}: free some space or "
                              "move the workdir, then run the same command again to resume from the last "
                              "checkpoint (checkpoints are written atomically; the ones on disk are intact).")

    return guarded


def run(main: Callable[[list[str]], None], flags_parser: Callable | None = None) -> None:
    """``absl.app.run`` for lidiff commands (see the module docstring)."""
    quiet_logs()
    if flags_parser is None:
        app.run(guard(main))
    else:
        app.run(guard(main), flags_parser=flags_parser)

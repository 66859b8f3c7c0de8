"""User-facing errors.

Every failure a user can cause (bad checkpoint, unknown model, size that breaks a
model's size rule, unwritable output, ...) is an :class:`EdgeSRError`.  The CLI prints
its message as one line and exits with ``exit_code``; nothing else is caught there, so
a bug still shows its traceback instead of hiding behind a friendly message.
"""

from __future__ import annotations


class EdgeSRError(Exception):
    """Base class of errors caused by the user's input (exit code 2)."""

    exit_code = 2


class UnknownModelError(EdgeSRError):
    pass


class CheckpointError(EdgeSRError):
    """The checkpoint file cannot be read, is unsafe, or does not fit the model."""


class SizeRuleError(EdgeSRError):
    """An input size the model (or its deploy form) cannot process exactly."""


class ExportError(EdgeSRError):
    """The requested export is not possible (e.g. dynamic shapes on TFLite)."""


class OutputError(EdgeSRError):
    """An output cannot be written: it is an input, a directory, on a full or read-only
    file system, or not permitted.  The message names the path and the reason."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived: unwinds like Ctrl-C so temp files are cleaned up.

    A KeyboardInterrupt, not an Exception, so no ``except Exception`` swallows it.
    Exit code 128 + signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.exit_code = 128 + signum
        self.signal_name = name


class ParityError(EdgeSRError):
    """An artifact missed its parity threshold (exit code 1)."""

    exit_code = 1

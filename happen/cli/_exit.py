"""Exit codes of the ``happen`` command, the error that ends it with one line, and the
signals that stop it."""

from __future__ import annotations

import signal

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "STOP_SIGNALS",
    "ApplicationError",
    "CommandError",
    "signal_exit_code",
]

#: Done, or stopped by SIGINT/SIGTERM after draining.
EXIT_OK = 0
#: The command ran and what it did failed: a handler raised, a call timed out, a worker died.
EXIT_FAILED = 1
#: The command could not start: bad arguments or settings, an unknown module or attribute,
#: a bad transport URL, payload JSON that does not parse, a server that cannot be reached.
EXIT_USAGE = 2

#: The signals that stop a command: serving drains, a call is cancelled, a watch ends.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CommandError(Exception):
    """Ends the command with ``code`` and ``message`` as one line on stderr, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def signal_exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by signal ``signum`` (128 + signum)."""
    return 128 + signum


class ApplicationError(CommandError):
    """The application's own code raised (importing it, or its setup function): the command
    shows the traceback of the cause, then the message, and exits with ``EXIT_FAILED``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_FAILED)

"""A live progress line on a terminal, for streamed items that carry a progress figure.

An item carries one when it is a dict whose ``"progress"`` is a number from 0 to 1 (an
optional ``"message"`` string is shown beside it). The line is drawn on stderr with plain
ANSI escapes and erased before each JSON line is written to stdout, so the two interleave
cleanly on one terminal; it is shown only when stdout and stderr are both terminals.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["ProgressLine", "progress_of"]

ERASE_LINE = "\r\x1b[2K"
BAR_WIDTH = 24


def progress_of(item: Any) -> tuple[float, str] | None:
    """The progress figure (0..1) and message of a streamed item, or None if it has none."""
    if type(item) is not dict:
        return None
    figure = item.get("progress")
    if isinstance(figure, bool) or not isinstance(figure, int | float) or not 0 <= figure <= 1:
        return None
    message = item.get("message")
    return float(figure), message if isinstance(message, str) else ""


class ProgressLine:
    """The progress of a stream on one terminal line: bar, percent, items read, time."""

    def __init__(
        self, out: TextIO, *, clock: Callable[[], float] = time.monotonic, columns: int = 0
    ) -> None:
        self._out = out
        self._clock = clock
        self._started = clock()
        self._columns = columns or shutil.get_terminal_size().columns
        self._items = 0
        self._figure: tuple[float, str] | None = None
        self._drawn = False

    @classmethod
    def for_terminal(cls) -> ProgressLine | None:
        """A progress line on stderr when stdout and stderr are terminals, else None."""
        if os.environ.get("TERM") == "dumb":
            return None
        if not (sys.stdout.isatty() and sys.stderr.isatty()):
            return None
        return cls(sys.stderr)

    def erase(self) -> None:
        """Erase the line, if drawn (before something else is written to the terminal)."""
        if self._drawn:
            self._out.write(ERASE_LINE)
            self._out.flush()
            self._drawn = False

    def update(self, item: Any) -> None:
        """Count ``item`` and redraw the line if any item so far carried a figure."""
        self._items += 1
        figure = progress_of(item)
        if figure is not None:
            self._figure = figure
        if self._figure is not None:
            self._out.write(ERASE_LINE + self.render())
            self._out.flush()
            self._drawn = True

    def render(self) -> str:
        """The text of the line, cut to the terminal's width."""
        assert self._figure is not None
        fraction, message = self._figure
        filled = round(fraction * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        elapsed = self._clock() - self._started
        items = f"{self._items} item" + ("" if self._items == 1 else "s")
        text = f"[{bar}] {fraction:4.0%}  {items}  {elapsed:.1f}s"
        if message:
            text += f"  {message}"
        return text[: max(self._columns - 1, 0)]

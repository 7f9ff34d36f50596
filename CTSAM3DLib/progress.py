"""A tiny progress bar on stderr (no dependencies).

On a terminal it redraws one line in place; in a log file (not a TTY) it writes one line per
update, at most every ``log_interval_s`` seconds, plus the final one, so logs stay short.

    with ProgressBar(total=len(items), description="evaluate") as bar:
        for item in items:
            ...
            bar.update(status=item.name)
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TextIO, TypeVar

Item = TypeVar("Item")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, remainder = divmod(seconds, 3600)
    minutes, seconds = divmod(remainder, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class ProgressBar:
    """Counts ``done`` out of ``total`` steps and shows the rate and the time left."""

    def __init__(
        self,
        total: int,
        description: str = "",
        stream: Optional[TextIO] = None,
        width: int = 24,
        log_interval_s: float = 10.0,
    ) -> None:
        if total < 0:
            raise ValueError(f"a progress bar needs a total >= 0, got {total}")
        self.total = total
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.log_interval_s = log_interval_s
        self.done = 0
        self.status = ""
        self._start = time.monotonic()
        self._last_log = float("-inf")
        self._closed = False
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self) -> str:
        """The bar as text, e.g. ``evaluate [#####-----] 3/10 00:12<00:28 liver``."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(fraction * self.width))
        elapsed = time.monotonic() - self._start
        remaining = elapsed / self.done * (self.total - self.done) if self.done else None
        timing = _format_seconds(elapsed) + (
            "<" + _format_seconds(remaining) if remaining is not None else ""
        )
        parts = [
            self.description,
            f"[{'#' * filled}{'-' * (self.width - filled)}]",
            f"{self.done}/{self.total}",
        ]
        parts += [timing, self.status]
        return " ".join(part for part in parts if part)

    def update(self, steps: int = 1, status: Optional[str] = None) -> None:
        """Advance by ``steps`` (0 to only change the status text) and redraw."""
        self.done = min(self.total, self.done + steps)
        if status is not None:
            self.status = status
        self._draw(final=self.done == self.total)

    def _draw(self, final: bool = False) -> None:
        if self._interactive:
            self.stream.write("\r\x1b[2K" + self.line() + ("\n" if final else ""))
            self.stream.flush()
            return
        now = time.monotonic()
        if final or now - self._last_log >= self.log_interval_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_log = now

    def close(self) -> None:
        """End the line (once), leaving the last state visible."""
        if self._closed:
            return
        self._closed = True
        if self._interactive and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        self._draw()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(items: Iterable[Item], total: int, description: str = "", **options) -> Iterator[Item]:
    """Yield ``items`` while showing a `ProgressBar` of ``total`` steps."""
    with ProgressBar(total, description, **options) as bar:
        for item in items:
            yield item
            bar.update()

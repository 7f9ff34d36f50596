"""Log lines of ``ctsam3d serve``, rate-limited: a flood of failing connections made asyncio log a traceback
for each (327 MB of log in 45 s, enough to fill a disk under a sustained attack)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Dict, Tuple

LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
"""The loggers whose handlers get the limit: the root logger (asyncio's and this package's records reach it)
and uvicorn's own, which do not propagate."""


class RateLimit(logging.Filter):
    """Lets at most ``burst`` records with the same logger and message template through per ``window_s``;
    the first one after a window in which some were dropped says how many."""

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._windows: Dict[Tuple[str, str], Tuple[float, int, int]] = {}
        """Per (logger, template): when its window began, records let through in it, records dropped."""
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            began, passed, dropped = self._windows.get(key, (now, 0, 0))
            if now - began >= self.window_s:
                began, passed, dropped, earlier = now, 0, 0, dropped
            else:
                earlier = 0
            if passed >= self.burst:
                self._windows[key] = (began, passed, dropped + 1)
                return False
            self._windows[key] = (began, passed + 1, dropped)
        if earlier:
            record.msg, record.args = f"{record.getMessage()} ({earlier} more like it were not logged)", None
        return True


def limit_log_rate(limit: RateLimit) -> None:
    """Puts ``limit`` on the handlers of ``LOGGERS`` (a stderr handler on the root logger if it has none)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
        root.addHandler(handler)
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(limit)

"""The server's memory budget (``ctsam3d serve --max-memory-mb``): what uploads being received, cached
images, sessions and the job on the worker may hold together.

Everything that can grow with what clients send reserves its bytes here before it allocates them; a
reservation that does not fit is refused at once (``OverBudgetError``, answered 503 with Retry-After), so
that nothing is admitted that would fail, or take the machine down, half way. Estimates are upper bounds
of what the allocation will hold; the process's own baseline (Python, torch, the network's weights) is
outside the budget.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

RETRY_AFTER_S = 10
"""What a refused client is told to wait before trying again."""

DEFAULT_SHARE = 0.5
"""Share of the machine's memory the budget takes when ``--max-memory-mb`` is not given."""


class OverBudgetError(Exception):
    """A reservation the budget cannot take now (503 with Retry-After)."""

    retry_after_s = RETRY_AFTER_S


def default_budget_bytes() -> Optional[int]:
    """``DEFAULT_SHARE`` of this machine's physical memory (None where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_SHARE)
    except (AttributeError, OSError, ValueError):
        return None


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


class MemoryBudget:
    """At most ``limit_bytes`` reserved at once. ``reclaim(nbytes)`` is asked to free that much (e.g. by
    dropping cached images nobody uses) before a reservation is refused; it returns what it freed."""

    def __init__(self, limit_bytes: int, reclaim: Callable[[int], int] = lambda nbytes: 0) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"the memory budget must be positive, got {limit_bytes} bytes")
        self.limit_bytes = limit_bytes
        self._reclaim = reclaim
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    @property
    def peak_bytes(self) -> int:
        with self._lock:
            return self._peak

    def reserve(self, nbytes: int, what: str) -> Reservation:
        """Reserves ``nbytes`` for ``what`` (named in the refusal); OverBudgetError when they do not fit."""
        reservation = Reservation(self, 0)
        reservation.resize(nbytes, what)
        return reservation

    def check(self, nbytes: int, what: str) -> None:
        """OverBudgetError unless ``nbytes`` would fit now (making room as ``reserve`` does); reserves nothing:
        for work that will reserve when it runs, refused at once when it could not."""
        self.reserve(nbytes, what).release()

    def _change(self, delta: int, what: str, force: bool) -> None:
        if delta > 0 and not force:
            if self._take(delta):
                return
            self._reclaim(delta - self._available())
            if self._take(delta):
                return
            raise OverBudgetError(
                f"the server's memory budget ({mib(self.limit_bytes)}, ctsam3d serve --max-memory-mb) cannot "
                f"take {what} ({mib(delta)}) now: {mib(self.used_bytes)} are in use; try again later")
        with self._lock:
            self._used += delta
            self._peak = max(self._peak, self._used)

    def _available(self) -> int:
        with self._lock:
            return self.limit_bytes - self._used

    def _take(self, delta: int) -> bool:
        with self._lock:
            if self._used + delta > self.limit_bytes:
                return False
            self._used += delta
            self._peak = max(self._peak, self._used)
            return True


class Reservation:
    """Bytes held in a ``MemoryBudget`` until ``release``; ``resize`` grows (refused when it does not fit,
    unless ``force``: for memory already allocated, which the budget must then count) or shrinks them."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self._lock = threading.Lock()

    def resize(self, nbytes: int, what: str = "this request", force: bool = False) -> None:
        with self._lock:
            self._budget._change(nbytes - self.nbytes, what, force)
            self.nbytes = nbytes

    def release(self) -> None:
        self.resize(0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

"""One persistent background thread for all torch work, and a main-thread wait that keeps Slicer responsive.

A single long-lived thread (not a thread per click) because CUDA/cuDNN caches are per thread: a fresh
thread per prediction pays the warm-up again. Jobs handed to it must not touch MRML, VTK or Qt.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable


class InferenceWorker:
    """Runs submitted callables one at a time, in submission order, on one daemon-like thread."""

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="CTSAM3D")

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self._executor.submit(function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)


def waitProcessingEvents(
    future: concurrent.futures.Future, processEvents: Callable[[], None], pollSeconds: float = 0.03
) -> Any:
    """Block the caller (the main thread) until ``future`` is done, pumping GUI events meanwhile;
    returns its result or raises its exception."""
    while True:
        try:
            return future.result(timeout=pollSeconds)
        except concurrent.futures.TimeoutError:
            processEvents()

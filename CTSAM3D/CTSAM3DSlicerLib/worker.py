"""One background thread for torch work, and the main-thread wait that keeps Slicer responsive.

Slicer runs Python through PythonQt without thread support: the main thread holds the GIL all the
time Qt's event loop runs C++ code, so a worker thread advances only while the main thread runs
Python that gives the GIL up. Polling a worker from a QTimer therefore starves it (a 1 s job took
15 s). The main thread instead waits in ``waitProcessingEvents``: a blocking wait that releases the
GIL, broken every ``POLL_SECONDS`` to let Qt process events (as SlicerNNInteractive does).

The worker is one long-lived daemon thread (CUDA/cuDNN caches are per thread, so a thread per job
would pay their warm-up again); ``shutdownAllWorkers`` stops every worker when Slicer's main window
closes, without waiting for a running job: whoever waits for that job gets WorkerStoppedError at once.
Jobs handed to it must not touch MRML, VTK or Qt.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import weakref
from typing import Any, Callable, Optional

POLL_SECONDS = 0.02
"""Longest time the main thread waits without processing events (Slicer stays responsive)."""

_workers: weakref.WeakSet[InferenceWorker] = weakref.WeakSet()


class WorkerStoppedError(RuntimeError):
    """The worker was shut down (Slicer is quitting); the job did not run."""


class InferenceWorker:
    """Runs submitted callables one at a time, in submission order, on one daemon thread."""

    def __init__(self, name: str = "CTSAM3D") -> None:
        self._jobs: queue.SimpleQueue[Optional[tuple]] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._runningJob: Optional[concurrent.futures.Future] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        _workers.add(self)

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopped.is_set():
            future.set_exception(WorkerStoppedError("CT-SAM3D's worker was shut down (Slicer is quitting)"))
            return future
        self._jobs.put((future, function, args))
        return future

    def shutdown(self) -> None:
        """Stop taking jobs and cancel the queued ones; a running job is left to end on its own (the
        thread is a daemon, so it never holds up Slicer's exit), but its waiter is released now."""
        self._stopped.set()
        self._jobs.put(None)
        running = self._runningJob
        if running is not None:
            _settle(running, error=WorkerStoppedError("CT-SAM3D's worker was shut down (Slicer is quitting)"))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            future, function, args = job
            if self._stopped.is_set():
                future.set_exception(WorkerStoppedError("CT-SAM3D's worker was shut down (Slicer is quitting)"))
                continue
            if not future.set_running_or_notify_cancel():
                continue
            self._runningJob = future
            try:
                result = function(*args)
            except BaseException as error:  # handed to the waiting main thread, which re-raises it
                _settle(future, error=error)
            else:
                _settle(future, result=result)
            finally:
                self._runningJob = None
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[0].set_exception(WorkerStoppedError("CT-SAM3D's worker was shut down (Slicer is quitting)"))


def _settle(future: concurrent.futures.Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Give ``future`` its outcome unless it has one (a shutdown fails a running job's future early)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class LatestValue:
    """Hands values from the worker to the main thread when only the newest matters (a preview that a
    later one supersedes): ``put`` on the worker replaces what was not taken yet, ``take`` on the main
    thread gets it once (None when nothing new arrived)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: Any = None

    def put(self, value: Any) -> None:
        with self._lock:
            self._value = value

    def take(self) -> Any:
        with self._lock:
            value, self._value = self._value, None
        return value


def shutdownAllWorkers() -> None:
    """Shut down every worker (connected to the application's lastWindowClosed and aboutToQuit)."""
    for worker in list(_workers):
        worker.shutdown()


def waitProcessingEvents(
    future: concurrent.futures.Future,
    processEvents: Callable[[], None],
    onTick: Optional[Callable[[], None]] = None,
    pollSeconds: float = POLL_SECONDS,
) -> Any:
    """Block the main thread until ``future`` is done, releasing the GIL while it waits and processing
    events (then ``onTick()``, e.g. to show progress) at least every ``pollSeconds``; returns the
    result or raises the job's exception. Events processed here may call back into the caller's
    code: callers guard against re-entrance."""
    while True:
        try:
            return future.result(timeout=pollSeconds)
        except concurrent.futures.TimeoutError:
            processEvents()
            if onTick is not None:
                onTick()

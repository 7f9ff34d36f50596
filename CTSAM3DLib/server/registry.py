"""The server's state: uploaded images, open sessions, and the one worker thread that runs the network.

All network work (opening a session, clicks, undo, reading a mask) runs on a single worker thread:
one network on one device gains nothing from running two clicks at once, and a session object is
then only ever touched by one thread. Jobs wait in a ``FairQueue``, which takes them round-robin
across sessions (one user's burst of clicks cannot starve another user) and in order within a
session. The same thread closes idle sessions (``SessionRegistry.expire``), between jobs.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Tuple, TypeVar

from .metrics import Metrics

T = TypeVar("T")

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """A session already has as many requests waiting as the server allows."""


class UnknownSessionError(KeyError):
    """No open session has this id (never opened, closed, expired, or opened with another token)."""


class SessionsFullError(Exception):
    """The server holds as many sessions as it allows."""


@dataclass
class _Job:
    work: Callable[[], Any]
    future: Future


class FairQueue:
    """Jobs for one worker thread, taken round-robin across keys, each key's jobs in submission order.

    ``on_tick`` runs on the worker thread every ``tick_s`` seconds (between jobs), so that housekeeping
    never runs beside a job.
    """

    def __init__(self, max_pending_per_key: int, tick_s: float, on_tick: Callable[[], None]) -> None:
        self.max_pending_per_key = max_pending_per_key
        self.tick_s = tick_s
        self._on_tick = on_tick
        self._jobs: Dict[str, Deque[_Job]] = {}
        self._turns: Deque[str] = deque()
        """Keys with jobs waiting, in the order they will next be served."""
        self._ready = threading.Condition()
        self._running: Optional[str] = None
        """The key whose job the worker runs now."""
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def submit(self, key: str, work: Callable[[], T]) -> Future:
        """Queues ``work`` under ``key``; its Future gives the result (or exception) once the worker ran it.
        Cancelling the Future before the worker reaches it means the work never runs."""
        job = _Job(work, Future())
        with self._ready:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            queued = self._jobs.get(key)
            if queued is None:
                queued = self._jobs[key] = deque()
                if key != self._running:
                    self._turns.append(key)
            if len(queued) >= self.max_pending_per_key:
                raise QueueFullError(f"{len(queued)} requests of this session are already waiting")
            queued.append(job)
            self._ready.notify()
        return job.future

    def pending(self) -> int:
        with self._ready:
            return sum(len(jobs) for jobs in self._jobs.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ctsam3d-network-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Lets the running job finish; cancels those still waiting."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._ready:
            for jobs in self._jobs.values():
                for job in jobs:
                    job.future.cancel()
            self._jobs.clear()
            self._turns.clear()

    def _next(self) -> Optional[_Job]:
        """The next job, the caller holding the lock: the first of the key whose turn it is. The key takes
        its next turn only once this job is done (``_done``), behind every key that queued meanwhile: a
        session that asks while another's burst runs waits for one job, not two."""
        if not self._turns:
            return None
        key = self._turns.popleft()
        queued = self._jobs[key]
        job = queued.popleft()
        if not queued:
            del self._jobs[key]
        self._running = key
        return job

    def _done(self) -> None:
        with self._ready:
            key, self._running = self._running, None
            if key in self._jobs and key not in self._turns:
                self._turns.append(key)

    def _work(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while True:
            with self._ready:
                job = self._next()
                while job is None and not self._stopping and time.monotonic() < next_tick:
                    self._ready.wait(max(0.0, next_tick - time.monotonic()))
                    job = self._next()
                if self._stopping:
                    if job is not None:
                        job.future.cancel()
                    return
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.tick_s
            if job is None:
                continue
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.work())
                except BaseException as error:  # handed to the waiting request, whatever it is
                    job.future.set_exception(error)
            self._done()

    def _tick(self) -> None:
        try:
            self._on_tick()
        except Exception:
            log.exception("housekeeping failed")


@dataclass
class _Entry:
    session: Any
    owner: Optional[int]
    """Index of the token that opened the session (None on a server without tokens): only it may use it."""
    last_used: float
    release: Callable[[], None]
    """Gives back what the session holds outside itself (its memory reservations)."""
    pending: int = 0
    closed: bool = False


class SessionRegistry:
    """Open sessions by their unguessable id, at most ``max_sessions``; each closed after
    ``idle_timeout_s`` seconds without a request. ``release`` runs on the worker, between jobs, after
    sessions were dropped (to hand the device memory they held back to the device)."""

    def __init__(self, metrics: Metrics, *, max_sessions: int, idle_timeout_s: float, max_pending_per_session: int,
                 sweep_interval_s: Optional[float] = None, release: Callable[[], None] = lambda: None) -> None:
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._release = release
        self._entries: Dict[str, _Entry] = {}
        self._opening = 0
        self._dropped = False
        """Whether sessions were dropped since ``release`` last ran."""
        self._lock = threading.Lock()
        sweep = sweep_interval_s if sweep_interval_s is not None else min(30.0, max(0.05, idle_timeout_s / 4))
        self._queue = FairQueue(max_pending_per_session, sweep, self.expire)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def pending(self) -> int:
        """Jobs waiting for the worker."""
        return self._queue.pending()

    def start(self) -> None:
        self._queue.start()

    def stop(self) -> None:
        self._queue.stop()
        with self._lock:
            for session_id in list(self._entries):
                self._drop(session_id)
        self._release()

    def open(self, owner: Optional[int], build: Callable[[], Any],
             release: Callable[[], None] = lambda: None) -> Tuple[str, Future]:
        """Reserves a place and queues ``build()`` (which makes the session) on the worker; returns the new
        session's id and a Future that is done once the session is open (holding None, not the session, so
        that only the registry keeps it alive). SessionsFullError when no place is left. ``release`` runs
        once the session is gone (closed, expired, or never opened)."""
        with self._lock:
            if len(self._entries) + self._opening >= self.max_sessions:
                raise SessionsFullError(f"this server holds its maximum of {self.max_sessions} sessions; "
                                   "close one or try again later")
            self._opening += 1
        session_id = secrets.token_urlsafe(24)

        def make() -> None:
            try:
                session = build()
            except BaseException:
                with self._lock:
                    self._opening -= 1
                release()
                raise
            with self._lock:
                self._opening -= 1
                self._entries[session_id] = _Entry(session, owner, time.monotonic(), release)
            self.metrics.sessions_created.inc()

        try:
            future = self._submit(session_id, "open", make)
        except BaseException:
            with self._lock:
                self._opening -= 1
            release()
            raise
        future.add_done_callback(lambda done: self._forget_opening(done, release))
        return session_id, future

    def run(self, session_id: str, owner: Optional[int], kind: str, work: Callable[[Any], T]) -> Future:
        """Queues ``work(session)`` behind the session's earlier requests; UnknownSessionError when there is no
        such session for this owner (the same answer either way, so ids cannot be probed)."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None or entry.owner != owner:
                raise UnknownSessionError(session_id)
            entry.pending += 1
            entry.last_used = time.monotonic()

        def job() -> T:
            if entry.closed:
                raise UnknownSessionError(session_id)
            return work(entry.session)

        try:
            future = self._submit(session_id, kind, job)
        except BaseException:
            self._done_with(entry)
            raise
        # A done callback runs for cancelled jobs too, so a client that went away leaves no count behind.
        future.add_done_callback(lambda _: self._done_with(entry))
        return future

    def close(self, session_id: str, owner: Optional[int]) -> Future:
        """Queues the session's closing behind its earlier requests."""
        def close(_: Any) -> None:
            with self._lock:
                self._drop(session_id)
            self.metrics.sessions_closed.inc()

        return self.run(session_id, owner, "close", close)

    def expire(self) -> int:
        """Closes every session idle for longer than the timeout with nothing queued, and hands the memory
        of sessions dropped since the last call back (``release``); returns how many sessions expired."""
        deadline = time.monotonic() - self.idle_timeout_s
        with self._lock:
            idle = [sid for sid, entry in self._entries.items() if entry.pending == 0 and entry.last_used < deadline]
            for sid in idle:
                self._drop(sid)
            dropped, self._dropped = self._dropped, False
        if idle:
            self.metrics.sessions_expired.inc(amount=len(idle))
            log.info("closed %d idle session(s)", len(idle))
        if dropped:
            self._release()
        return len(idle)

    def _drop(self, session_id: str) -> None:
        """Forgets a session, the caller holding the lock. Its entry may live on in a finished job's
        closure for a while, so the session itself is let go of here."""
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            entry.closed = True
            entry.session = None
            entry.release()
            self._dropped = True

    def _submit(self, key: str, kind: str, work: Callable[[], T]) -> Future:
        submitted = time.monotonic()

        def timed() -> T:
            started = time.monotonic()
            self.metrics.queue_wait.observe(started - submitted, (kind,))
            try:
                return work()
            finally:
                self.metrics.job_duration.observe(time.monotonic() - started, (kind,))

        return self._queue.submit(key, timed)

    def _done_with(self, entry: _Entry) -> None:
        with self._lock:
            entry.pending -= 1
            entry.last_used = time.monotonic()

    def _forget_opening(self, future: Future, release: Callable[[], None]) -> None:
        """An opening cancelled before it ran gives its reserved place back."""
        if future.cancelled():
            with self._lock:
                self._opening -= 1
            release()

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
from typing import Any, Callable, Deque, Dict, Hashable, Optional, Tuple, TypeVar

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
    """Jobs for one worker thread, taken round-robin across groups (a user's token), within a group
    round-robin across keys (its sessions), each key's jobs in submission order: a user with many
    sessions gets the worker as often as a user with one.

    ``on_tick`` runs on the worker thread every ``tick_s`` seconds (between jobs), so that housekeeping
    never runs beside a job.
    """

    def __init__(self, max_pending_per_key: int, tick_s: float, on_tick: Callable[[], None]) -> None:
        self.max_pending_per_key = max_pending_per_key
        self.tick_s = tick_s
        self._on_tick = on_tick
        self._jobs: Dict[str, Deque[_Job]] = {}
        self._keys: Dict[Hashable, Deque[str]] = {}
        """Per group, its keys with jobs waiting, in the order they will next be served."""
        self._turns: Deque[Hashable] = deque()
        """Groups with keys waiting, in the order they will next be served."""
        self._ready = threading.Condition()
        self._running: Optional[Tuple[Hashable, str]] = None
        """The group and key whose job the worker runs now."""
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    def submit(self, key: str, work: Callable[[], T], group: Hashable = None) -> Future:
        """Queues ``work`` under ``key`` (of ``group``); its Future gives the result (or exception) once the
        worker ran it. Cancelling the Future before the worker reaches it means the work never runs."""
        job = _Job(work, Future())
        with self._ready:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            queued = self._jobs.get(key)
            if queued is not None and len(queued) >= self.max_pending_per_key:
                raise QueueFullError(f"{len(queued)} requests of this session are already waiting")
            if queued is None:
                queued = self._jobs[key] = deque()
                if self._running != (group, key):
                    self._wait_turn(group, key)
            queued.append(job)
            self._ready.notify()
        return job.future

    def pending(self) -> int:
        with self._ready:
            return sum(len(jobs) for jobs in self._jobs.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ctsam3d-network-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancels the jobs still waiting; gives the running one ``timeout_s`` to finish (the worker is a
        daemon thread: a stopping server does not wait for it longer)."""
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
            self._keys.clear()
            self._turns.clear()

    def _wait_turn(self, group: Hashable, key: str) -> None:
        """Puts a key behind its group's other keys, and the group behind the others unless it waits or runs
        already; the caller holds the lock."""
        self._keys.setdefault(group, deque()).append(key)
        running = self._running is not None and self._running[0] == group
        if group not in self._turns and not running:
            self._turns.append(group)

    def _next(self) -> Optional[_Job]:
        """The next job, the caller holding the lock: the first of the next key of the group whose turn it
        is. Key and group take their next turns only once this job is done (``_done``), behind every one that
        queued meanwhile: a session that asks while another's burst runs waits for one job, not two."""
        if not self._turns:
            return None
        group = self._turns.popleft()
        keys = self._keys[group]
        key = keys.popleft()
        if not keys:
            del self._keys[group]
        queued = self._jobs[key]
        job = queued.popleft()
        if not queued:
            del self._jobs[key]
        self._running = (group, key)
        return job

    def _done(self) -> None:
        with self._ready:
            (group, key), self._running = self._running, None
            if key in self._jobs:
                self._keys.setdefault(group, deque()).append(key)
            if group in self._keys and group not in self._turns:
                self._turns.append(group)

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
    """Open sessions by their unguessable id, at most ``max_sessions``, at most ``max_sessions_per_owner`` of
    them opened with one token; each closed after ``idle_timeout_s`` seconds without a request that
    succeeded (a refused one keeps nothing alive). ``release`` runs on the worker, between jobs, after
    sessions were dropped (to hand the device memory they held back to the device)."""

    def __init__(self, metrics: Metrics, *, max_sessions: int, idle_timeout_s: float, max_pending_per_session: int,
                 sweep_interval_s: Optional[float] = None, release: Callable[[], None] = lambda: None,
                 max_sessions_per_owner: Optional[int] = None) -> None:
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.max_sessions_per_owner = max_sessions_per_owner or max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._release = release
        self._entries: Dict[str, _Entry] = {}
        self._opening: Dict[Optional[int], int] = {}
        """Per owner, the sessions being opened (their places are taken already)."""
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
            if len(self._entries) + sum(self._opening.values()) >= self.max_sessions:
                raise SessionsFullError(f"this server holds its maximum of {self.max_sessions} sessions; "
                                        "close one or try again later")
            held = self._opening.get(owner, 0) + sum(entry.owner == owner for entry in self._entries.values())
            if held >= self.max_sessions_per_owner:
                raise SessionsFullError(f"this token holds its maximum of {self.max_sessions_per_owner} sessions "
                                        "(ctsam3d serve --max-sessions-per-token); close one or try again later")
            self._opening[owner] = self._opening.get(owner, 0) + 1
        session_id = secrets.token_urlsafe(24)

        def make() -> None:
            try:
                session = build()
            except BaseException:
                self._opened(owner)
                release()
                raise
            with self._lock:
                self._entries[session_id] = _Entry(session, owner, time.monotonic(), release)
            self._opened(owner)
            self.metrics.sessions_created.inc()

        try:
            future = self._submit(session_id, owner, "open", make)
        except BaseException:
            self._opened(owner)
            release()
            raise
        future.add_done_callback(lambda done: self._forget_opening(done, owner, release))
        return session_id, future

    def run(self, session_id: str, owner: Optional[int], kind: str, work: Callable[[Any], T],
            admit: Callable[[Any], None] = lambda session: None) -> Future:
        """Queues ``work(session)`` behind the session's earlier requests, once ``admit(session)`` did not refuse
        it (by raising); UnknownSessionError when there is no such session for this owner (the same answer
        either way, so ids cannot be probed)."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None or entry.owner != owner:
                raise UnknownSessionError(session_id)
            session = entry.session
        admit(session)
        with self._lock:
            entry.pending += 1

        def job() -> T:
            if entry.closed:
                raise UnknownSessionError(session_id)
            return work(entry.session)

        try:
            future = self._submit(session_id, owner, kind, job)
        except BaseException:
            self._done_with(entry, None)
            raise
        # A done callback runs for cancelled jobs too, so a client that went away leaves no count behind.
        future.add_done_callback(lambda done: self._done_with(entry, done))
        return future

    def close(self, session_id: str, owner: Optional[int]) -> Future:
        """Queues the session's closing behind its earlier requests."""
        def close(_: Any) -> None:
            with self._lock:
                self._drop(session_id)
            self.metrics.sessions_closed.inc()

        return self.run(session_id, owner, "close", close)

    def discard(self, session_id: str) -> None:
        """Closes a session at once (from a job of its own, on the worker): its requests still queued find no
        session."""
        with self._lock:
            self._drop(session_id)
        self.metrics.sessions_closed.inc()

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

    def _submit(self, key: str, owner: Optional[int], kind: str, work: Callable[[], T]) -> Future:
        submitted = time.monotonic()

        def timed() -> T:
            started = time.monotonic()
            self.metrics.queue_wait.observe(started - submitted, (kind,))
            try:
                return work()
            finally:
                self.metrics.job_duration.observe(time.monotonic() - started, (kind,))

        return self._queue.submit(key, timed, group=owner)

    def _done_with(self, entry: _Entry, job: Optional[Future]) -> None:
        """A job of the session is over: only one that succeeded renews its idle time."""
        succeeded = job is not None and not job.cancelled() and job.exception() is None
        with self._lock:
            entry.pending -= 1
            if succeeded:
                entry.last_used = time.monotonic()

    def _opened(self, owner: Optional[int]) -> None:
        with self._lock:
            self._opening[owner] -= 1
            if not self._opening[owner]:
                del self._opening[owner]

    def _forget_opening(self, future: Future, owner: Optional[int], release: Callable[[], None]) -> None:
        """An opening cancelled before it ran gives its reserved place back."""
        if future.cancelled():
            self._opened(owner)
            release()

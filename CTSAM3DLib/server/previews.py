"""Previews of a prompt streamed to its client as the worker makes them (a prompt with "previews": true).

A click that cross-patch prompting carries into many patches takes seconds; the session previews the mask
before each further level of neighbours (``CTSAM3DLib.interface.PreviewCallback``). Here those previews
travel from the worker to the request, which streams them as frames of ``protocol.STREAM_MEDIA_TYPE``,
then the answer (or the error) as the last frame.

Bounds: the worker never waits for the client (it shares the worker with everyone), and the server never
holds more than one preview a client has not been sent yet: a newer preview replaces an unsent older one
(each holds the one before: its box holds the older box, and the mask there is the older one grown). A
slow reader thus gets fewer previews, never more memory held for it. Once the result is ready, unsent
previews are dropped: the answer supersedes them.

A client that hangs up while it waits has its job cancelled if it has not started, as without previews
(``disconnects``); once the job runs, the next preview it offers raises ``ClientGoneError`` on the worker,
which abandons the click (the session is left as before it: the session's rule for a failing callback),
so the worker is not held for work nobody reads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, Dict, Mapping, Optional

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .. import protocol
from ..interface import MaskUpdate
from .disconnects import ClientGoneError, ignore_outcome, wait_for_disconnect
from .refusals import describe

log = logging.getLogger(__name__)


class PreviewChannel:
    """Hands one job's previews from the worker to the request streaming them: at most one waits."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._latest: Optional[MaskUpdate] = None
        self._left = False
        self.ready = asyncio.Event()
        """Set (on the event loop) when a preview may be waiting."""

    def put(self, update: MaskUpdate) -> None:
        """On the worker: offers a preview, replacing one not taken yet; ClientGoneError once the client left
        (the session then abandons the click)."""
        with self._lock:
            if self._left:
                raise ClientGoneError()
            self._latest = update
        try:
            self._loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError as error:  # the event loop is closed: the server stops, nobody reads
            raise ClientGoneError() from error

    def take(self) -> Optional[MaskUpdate]:
        """On the event loop: the newest preview not taken yet, or None."""
        self.ready.clear()
        with self._lock:
            update, self._latest = self._latest, None
        return update

    def leave(self) -> None:
        """Nobody reads any more: drops what waits, and makes the next ``put`` fail."""
        with self._lock:
            self._left, self._latest = True, None


class PreviewStream:
    """The frames of one job's answer: its previews as they come, then its answer or error."""

    def __init__(self, request: Request, job: Future, channel: PreviewChannel,
                 encode: Callable[[Any], Mapping[str, Any]]) -> None:
        self._job = job
        self._outcome = asyncio.wrap_future(job)
        self._channel = channel
        self._encode = encode
        self._gone = asyncio.ensure_future(wait_for_disconnect(request))
        self._finished = False

    async def first_frame(self) -> bytes:
        """The first frame, once there is one. A job that fails before it raises its error, answered as
        without previews; ClientGoneError when the client leaves first."""
        try:
            update = await self._next_preview()
            if update is None:
                self._finished = True
                outcome = self._outcome.result()
                return await run_in_threadpool(self._answer_frame, outcome)
            return await run_in_threadpool(_preview_frame, update)
        except BaseException:
            self.close()
            raise

    async def next_frame(self) -> Optional[bytes]:
        """The next frame; None after the last. ClientGoneError when the client leaves."""
        if self._finished:
            return None
        update = await self._next_preview()
        if update is not None:
            return await run_in_threadpool(_preview_frame, update)
        self._finished = True
        error = self._outcome.exception()
        if error is None:
            return await run_in_threadpool(self._answer_frame, self._outcome.result())
        status, body, _ = describe(error)
        if status == 500:
            log.error("a prompt failed after its first preview was sent", exc_info=error)
        return protocol.frame_bytes({"status": status, **body})

    def close(self) -> None:
        """Stops watching the client; a job not finished yet is abandoned (see the module docstring)."""
        self._gone.cancel()
        if not self._outcome.done():
            self._channel.leave()
            self._job.cancel()
            self._outcome.add_done_callback(ignore_outcome)

    async def _next_preview(self) -> Optional[MaskUpdate]:
        """The newest preview, or None once the job is done (its unsent previews superseded by its answer)."""
        while not self._outcome.done():
            update = self._channel.take()
            if update is not None:
                return update
            ready = asyncio.ensure_future(self._channel.ready.wait())
            try:
                await asyncio.wait({self._outcome, ready, self._gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
            if self._gone.done() and not self._outcome.done():
                raise ClientGoneError()
        return None

    def _answer_frame(self, outcome: Any) -> bytes:
        return protocol.frame_bytes({protocol.FRAME_ANSWER: self._encode(outcome)})


def _preview_frame(update: MaskUpdate) -> bytes:
    return protocol.frame_bytes({protocol.FRAME_PREVIEW: protocol.encode_update(update)})


class PreviewResponse(Response):
    """A 200 answer of ``protocol.STREAM_MEDIA_TYPE`` that sends a ``PreviewStream``'s frames as they come.
    Its own ASGI loop (not Starlette's StreamingResponse, whose handling of a departing client differs between
    versions): a client that leaves ends it quietly, and the stream's job is abandoned."""

    media_type = protocol.STREAM_MEDIA_TYPE

    def __init__(self, first: bytes, stream: PreviewStream) -> None:
        self.status_code = 200
        self.background = None
        self._first, self._stream = first, stream
        # No proxy should hold the frames back (nginx buffers answers unless told so).
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        frame: Optional[bytes] = self._first
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while frame is not None:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                frame = await self._stream.next_frame()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGoneError, OSError):
            return  # nobody reads the rest
        finally:
            self._stream.close()

"""Connection hygiene for uvicorn: how many connections, how long a request's headers and body may take,
and how long a stopping server waits for the requests in flight.

uvicorn's own keep-alive timer starts only after a first answer, so a client that trickles a header byte
every few seconds held its connection forever (20,000 of them, no token needed, exhausted the server's
file descriptors). Here every connection must deliver its headers within ``header_timeout_s`` and its body
within ``body_timeout_s``, and connections past ``max_connections`` are closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .bounds import ConnectionLimits

log = logging.getLogger(__name__)


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the deadlines of ``ConnectionLimits`` (set by ``uvicorn_config``)."""

    limits = ConnectionLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._phase: Optional[str] = None
        self._deadline: Optional[asyncio.TimerHandle] = None
        if len(self.connections) > self.limits.max_connections:
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Arms the deadline of what the connection waits for from the client: a request's headers, its
        body, or nothing (the request is with the application)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm("headers")
        elif state is h11.SEND_BODY:
            self._arm("body")
        else:
            self._arm(None)

    def _arm(self, phase: Optional[str]) -> None:
        if phase == getattr(self, "_phase", None):
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            seconds = self.limits.header_timeout_s if phase == "headers" else self.limits.body_timeout_s
            self._deadline = self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        log.debug("closed a connection whose request %s did not arrive in time", self._phase)
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, host: str, port: int, limits: ConnectionLimits, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with ``limits`` (HTTP/1.1 through h11, whose parser bounds a
    request's headers to 16 kB)."""
    protocol = type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                          limit_concurrency=limits.max_connections, timeout_keep_alive=limits.keep_alive_s,
                          timeout_graceful_shutdown=limits.shutdown_timeout_s)

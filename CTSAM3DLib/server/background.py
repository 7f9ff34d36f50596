"""``BackgroundServer``: an app served by uvicorn on a thread of this process."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import uvicorn

from .bounds import ConnectionLimits
from .connections import uvicorn_config


class BackgroundServer:
    """An app served by uvicorn on a thread of this process, on loopback by default: for tests, benchmarks
    and programs that embed the server. ``port`` 0 takes a free port (``port`` then tells which)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 limits: Optional[ConnectionLimits] = None) -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.limits = limits or ConnectionLimits()
        self._server: Optional[uvicorn.Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._server = uvicorn.Server(uvicorn_config(self.app, self.host, self.port, self.limits, self.log_level))
        self._thread = threading.Thread(target=self._server.run, name="ctsam3d-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"uvicorn on {self.url} did not stop within {timeout_s} s")

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

"""Helpers for the tests of ``ctsam3d serve``: servers started and stopped, raw HTTP requests (for what
``RemoteSession`` never sends). Stand-in networks are ``standins.networks``; a zlib bomb ``standins.payloads``."""

import http.client
import json
import socket
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

import pytest

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as missing:
    pytest.fail(f"the server tests need FastAPI and uvicorn ({missing}): pip install -e '.[test]'", pytrace=False)

from CTSAM3DLib.server.app import BackgroundServer, create_app
from standins.networks import CrossPatchThresholdNet


def inside(image, x, y, z):
    """The LPS point at a continuous (x, y, z) index."""
    return image.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])


class Servers:
    """Servers started by a test (``start(network, port, **create_app options)``), all stopped by ``stop``."""

    def __init__(self) -> None:
        self.started: List[BackgroundServer] = []

    def start(self, network=None, port: int = 0, limits=None, **options) -> BackgroundServer:
        app = create_app(network or CrossPatchThresholdNet(), device="cpu", **options)
        server = BackgroundServer(app, port=port, **({} if limits is None else {"limits": limits}))
        self.started.append(server.start())
        return server

    def stop(self) -> None:
        for server in self.started:
            server.stop()


def request(url: str, method: str, path: str, body: Any = None, headers: Optional[Dict[str, str]] = None,
            token: Optional[str] = None) -> Tuple[int, Any]:
    """One request on a fresh connection: (status, JSON answer, or the raw bytes when it is not JSON).
    A dict or list body is sent as JSON (NaN written as NaN, as Python's json does)."""
    parsed = urllib.parse.urlparse(url)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    if response.getheader("content-type", "").startswith("application/json"):
        return response.status, json.loads(data)
    return response.status, data


def wait_until(condition, timeout_s: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

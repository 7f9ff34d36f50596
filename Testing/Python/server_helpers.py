"""Helpers for the tests of ``ctsam3d serve``: raw HTTP requests (for what ``RemoteSession`` never sends),
stand-in networks that are slow or watched, and a zlib bomb."""

import http.client
import json
import socket
import struct
import threading
import time
import urllib.parse
import weakref
import zlib
from typing import Any, Dict, List, Optional, Tuple

import pytest

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as missing:
    pytest.fail(f"the server tests need FastAPI and uvicorn ({missing}): pip install -e '.[test]'", pytrace=False)

from standins import CrossPatchThresholdNet

from CTSAM3DLib.server.app import BackgroundServer, create_app


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


class SlowNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet whose decoder takes at least ``decode_s`` seconds: a job long enough to queue
    behind. Records when each decode ends. ``started`` is set when a decode begins."""

    def __init__(self, decode_s: float) -> None:
        super().__init__()
        self.decode_s = decode_s
        self.started = threading.Event()

    def decode(self, features, points, labels, mask_prompt=None):
        self.started.set()
        time.sleep(self.decode_s)
        return super().decode(features, points, labels, mask_prompt)


class WatchedNet(CrossPatchThresholdNet):
    """CrossPatchThresholdNet that keeps weak references to the features it hands out: they stay alive
    exactly as long as some session holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.features: List[weakref.ref] = []

    def encode(self, image):
        features = [image.clone()]
        self.features += [weakref.ref(feature) for feature in features]
        return features


def zlib_bomb(total_bytes: int, chunk_bytes: int = 16 << 20) -> bytes:
    """A valid zlib stream of ``total_bytes`` zeros in about 1 kB per MB, made without building the zeros:
    after a full flush, every further chunk of zeros compresses to the same bytes, so one is repeated."""
    chunk = bytes(chunk_bytes)
    count = total_bytes // chunk_bytes
    compressor = zlib.compressobj(9)
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    middle = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH) == middle
    last = compressor.compress(chunk) + compressor.flush()
    checksum = 1
    for _ in range(count):
        checksum = zlib.adler32(chunk, checksum)
    return first + middle * (count - 2) + last[:-4] + struct.pack(">I", checksum)

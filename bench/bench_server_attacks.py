"""The worst cases of the attack log (../shared/research/server-attack.md) replayed against one ``ctsam3d
serve``: an honest user's click latency under each attack, and the server's peak memory against its budget.

One server (uvicorn on loopback, in this process, two tokens: the attacker's and the honest user's) with a
stand-in network whose decoder takes ``--decode-ms`` (a click's cost on the worker, the unit every attack
multiplies). For each attack the honest user clicks ``--clicks`` times on abdomen-ct-3mm while the attack
runs; the issue's bound is: at most twice the unloaded click plus one attacker batch (the longest job an
attacker may put on the worker: one click, or one ``set_clicks`` step of 8 clicks).

    python -m bench.bench_server_attacks
    python -m bench.bench_server_attacks --decode-ms 100 --clicks 7 --budget-mb 1536

Peak memory is this process's resident memory (server and attacking clients together; the clients hold
little) above its level before the attack, and the budget's own peak of reserved bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shlex
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from bench.common import log, machine_description, shared_data
from CTSAM3DLib import protocol
from CTSAM3DLib.remote import RemoteSession
from CTSAM3DLib.server.app import BackgroundServer, create_app
from CTSAM3DLib.server.metrics import resident_memory_bytes
from standins.networks import SlowNet
from standins.payloads import zlib_bomb

ATTACKER, HONEST = "attacker-token-for-the-bench-0123", "honest-token-for-the-bench-012345"
HEADER_TIMEOUT_S = 2.0
"""The server's header deadline here (10 s by default), so that the slowloris attack ends within the bench."""

DATA = shared_data() / "abdomen-ct-3mm" / "ct.nii.gz"


def call(port: int, method: str, path: str, body: Any = None, token: Optional[str] = None,
         headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes]:
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class PeakMemory:
    """This process's peak resident memory while it runs, sampled every 10 ms."""

    def __init__(self) -> None:
        self.baseline = resident_memory_bytes() or 0
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, resident_memory_bytes() or 0)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.baseline


class Flood:
    """``threads`` attackers repeating ``attack()`` until stopped; counts answers by status."""

    def __init__(self, attack: Callable[[], int], threads: int) -> None:
        self.statuses: Dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(attack,), daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _loop(self, attack: Callable[[], int]) -> None:
        # A pause between tries, so that a refused attacker does not just measure this process's GIL.
        while not self._stop.wait(0.01):
            try:
                status = attack()
            except OSError:
                status = 0
            with self._lock:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def stop(self) -> Dict[int, int]:
        self._stop.set()
        for thread in self._threads:
            thread.join(600)
        return self.statuses


def honest_clicks(session: RemoteSession, image: sitk.Image, count: int) -> List[float]:
    latencies = []
    for n in range(count):
        point = image.TransformContinuousIndexToPhysicalPoint([60.0 + n % 3, 50.0, 15.0])
        started = time.perf_counter()
        session.add_click(point, bool(n % 2 == 0))
        latencies.append(time.perf_counter() - started)
    return latencies


def scattered(image: sitk.Image, count: int, seed: int) -> List[List[Any]]:
    rng = np.random.default_rng(seed)
    return [[list(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in xyz])), True]
            for xyz in rng.uniform([10, 10, 3], [110, 90, 27], size=(count, 3))]


def open_body(image: sitk.Image, **options: Any) -> Dict[str, Any]:
    return {"image": protocol.array_digest(sitk.GetArrayViewFromImage(image)), "origin": list(image.GetOrigin()),
            "spacing": list(image.GetSpacing()), "direction": list(image.GetDirection()), "options": options}


def attacks(port: int, image: sitk.Image, opened: List[str]) -> List[Tuple[str, Callable[[], Any]]]:
    """(name, start) for each attack: start() begins it and returns a function that ends it and says what
    the attacker got. Sessions the attacker opens are listed in ``opened``."""
    api = protocol.API

    def open_session(**options: Any) -> str:
        status, data = call(port, "POST", f"{api}/sessions", open_body(image, **options), ATTACKER)
        if status != 201:
            raise RuntimeError(f"the attacker could not open a session: {status} {data[:200]!r}")
        opened.append(json.loads(data)["session"])
        return opened[-1]

    def max_patches() -> Callable[[], str]:
        flood = Flood(lambda: call(port, "POST", f"{api}/sessions", open_body(image, max_patches=10**9),
                                   ATTACKER)[0], 1)
        return lambda: f"answers {flood.stop()}"

    def set_clicks() -> Callable[[], str]:
        session = open_session(cross_patch=False)
        lists = [scattered(image, 64, 1), []]

        def attack() -> int:
            lists.reverse()
            return call(port, "PUT", f"{api}/sessions/{session}/clicks", {"clicks": lists[0]}, ATTACKER)[0]

        flood = Flood(attack, 1)
        return lambda: f"answers {flood.stop()}"

    def many_sessions() -> Callable[[], str]:
        sessions = [open_session(cross_patch=False) for _ in range(8)]
        point = list(image.TransformContinuousIndexToPhysicalPoint([30.0, 40.0, 10.0]))
        threads = [Flood(lambda s=s: call(port, "POST", f"{api}/sessions/{s}/click", {"point_lps": point},
                                          ATTACKER)[0], 4) for s in sessions]
        return lambda: f"answers {merge([flood.stop() for flood in threads])}"

    def session_lock_out() -> Callable[[], str]:
        statuses: Dict[int, int] = {}
        for _ in range(40):
            status, data = call(port, "POST", f"{api}/sessions", open_body(image), ATTACKER)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 201:
                opened.append(json.loads(data)["session"])
        return lambda: f"opens {statuses}"

    def zlib_bombs() -> Callable[[], str]:
        bomb = zlib_bomb(1 << 30)
        headers = {protocol.DTYPE_HEADER: "uint8", protocol.SHAPE_HEADER: "1024,1024,1024"}
        flood = Flood(lambda: call(port, "PUT", f"{api}/images/{'b' * 64}", bomb, ATTACKER, headers)[0], 8)
        return lambda: f"answers {flood.stop()}"

    def slowloris() -> Callable[[], str]:
        connections = []
        for _ in range(800):
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=5)
                connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
                connections.append(connection)
            except OSError:
                break

        def end() -> str:
            time.sleep(HEADER_TIMEOUT_S + 0.5)
            closed = 0
            for connection in connections:
                connection.settimeout(0.01)
                with contextlib.suppress(OSError):
                    closed += connection.recv(16) == b""
                connection.close()
            return f"{len(connections)} connections opened, {closed} closed by the server"

        return end

    def metrics_cardinality() -> Callable[[], str]:
        for n in range(3000):
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(f"X{n:08d} /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                connection.recv(1024)
        size = len(call(port, "GET", "/metrics", token=HONEST)[1])
        return lambda: f"3000 made-up methods; /metrics {size / 1024:.0f} kB"

    def fine_grid() -> Callable[[], str]:
        # The log's case: uint8 512^3, spacing 0.15 mm, rotated 0.5 rad about z: one click's rendering took
        # +5.1 GB. A patch then covers the whole image (134 M voxels): refused when the session opens.
        array = np.zeros((512, 512, 512), dtype=np.uint8)
        array[200:300, 200:300, 200:300] = 200
        digest = protocol.array_digest(array)
        call(port, "PUT", f"{api}/images/{digest}", protocol.compress(array), ATTACKER, protocol.array_headers(array))
        c, s = np.cos(0.5), np.sin(0.5)
        body = {"image": digest, "origin": [0.0, 0.0, 0.0], "spacing": [0.15] * 3,
                "direction": [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0]}
        status, data = call(port, "POST", f"{api}/sessions", body, ATTACKER)
        return lambda: f"open: {status} ({json.loads(data).get('error', '')[:48]}...)"

    return [("unloaded", lambda: (lambda: "")), ("max_patches 10**9", max_patches),
            ("set_clicks of 64 scattered clicks, repeated", set_clicks),
            ("8 sessions x 4 queued clicks (one token)", many_sessions), ("40 session opens (one token)",
                                                                         session_lock_out),
            ("8 concurrent zlib bombs stating 1 GiB", zlib_bombs), ("800 slowloris connections", slowloris),
            ("made-up HTTP methods", metrics_cardinality), ("uint8 512^3, 0.15 mm, oblique", fine_grid)]


def merge(counts: Sequence[Dict[int, int]]) -> Dict[int, int]:
    merged: Dict[int, int] = {}
    for count in counts:
        for status, n in count.items():
            merged[status] = merged.get(status, 0) + n
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-ms", type=float, default=100.0, help="the stand-in decoder's cost per call")
    parser.add_argument("--clicks", type=int, default=5, help="honest clicks per attack")
    parser.add_argument("--budget-mb", type=float, default=1536.0, help="the server's --max-memory-mb")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    image = sitk.ReadImage(str(DATA))
    budget = int(args.budget_mb * 2**20)
    from CTSAM3DLib.server.bounds import ConnectionLimits

    app = create_app(SlowNet(args.decode_ms / 1000), device="cpu", tokens=[ATTACKER, HONEST],
                     max_memory_bytes=budget)
    limits = ConnectionLimits(header_timeout_s=HEADER_TIMEOUT_S)
    rows = []
    with BackgroundServer(app, limits=limits) as server:
        state = app.state.server
        honest = RemoteSession(server.url, image, HONEST, cross_patch=False)
        honest_clicks(honest, image, 1)
        batch_started = time.perf_counter()
        honest.set_clicks([(p, True) for p, _ in scattered(image, 8, 2)])
        attacker_batch = time.perf_counter() - batch_started
        honest.set_clicks([])
        unloaded = None
        opened: List[str] = []
        for name, start in attacks(server.port, image, opened):
            log(f"attack: {name}")
            memory = PeakMemory()
            end = start()
            latencies = honest_clicks(honest, image, args.clicks)
            outcome = end()
            growth = memory.stop()
            while opened:
                call(server.port, "DELETE", f"{protocol.API}/sessions/{opened.pop()}", token=ATTACKER)
            median = statistics.median(latencies)
            unloaded = median if unloaded is None else unloaded
            rows.append((name, median, max(latencies), 2 * unloaded + attacker_batch, growth, outcome))
            log(f"  honest median {median:.2f} s; {outcome}")
        peak_reserved = state.budget.peak_bytes
        honest.close()
    command = "python -m bench.bench_server_attacks " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"Machine: {machine_description(torch.device('cpu'))}. Command: `{command}`. Stand-in decoder "
          f"{args.decode_ms:g} ms per call; one attacker batch (set_clicks step of 8 clicks) {attacker_batch:.2f} s; "
          f"budget {args.budget_mb:g} MiB, peak reserved {peak_reserved / 2**20:.0f} MiB.\n")
    print("| attack | honest click, median (s) | max (s) | bound (s) | peak RSS growth (MiB) | the attacker got |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, median, longest, bound, growth, outcome in rows:
        print(f"| {name} | {median:.2f} | {longest:.2f} | {bound:.2f} | {growth / 2**20:.0f} | {outcome} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many users on one ``ctsam3d serve``: click latency, throughput and the server's memory.

For 1, 4 and 16 simulated users, each a thread with its own ``RemoteSession`` on one server (uvicorn on
loopback, in this process), every user clicks ``--clicks`` times near the CT's centre as fast as the
answers come: the median and 95th percentile of a click's latency as its user sees it, the clicks per
second the server gets through, and the errors (there must be none). Then ``--sessions`` sessions are
opened, clicked once and left to expire (a one-second idle timeout): the server's resident memory before
and after says whether expired sessions give their memory back.

    python -m bench.bench_server                          # the cheap stand-in network (protocol and queue)
    python -m bench.bench_server --network real           # CT-SAM3D on reference weights
    python -m bench.bench_server --network both --users 1 4 --clicks 10

The stand-in (``BallNet``, below) answers at once, so its numbers are those of the server itself: HTTP,
JSON, compression, the queue, the session's bookkeeping. Clients and server share this process (and
its GIL), so these are upper bounds for a server on its own machine. The reference weights are not
trained: timings are the real network's, masks mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from bench.common import load_network, log, machine_description, shared_data
from CTSAM3DLib.remote import RemoteSession
from CTSAM3DLib.server.app import BackgroundServer, create_app
from CTSAM3DLib.server.metrics import resident_memory_bytes
from standins.networks import BallNet

NETWORKS = ("stand-in", "real")


def click_points(image: sitk.Image, count: int, seed: int) -> List[Tuple[Tuple[float, float, float], bool]]:
    """A user's clicks: the first at the CT's centre, then within about 30 mm of it (mostly refining the
    patch the first opened, now and then opening a neighbour), seven in ten positive."""
    rng = np.random.default_rng(seed)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    clicks = [(tuple(centre), True)]
    for _ in range(count - 1):
        offset = rng.uniform([-30, -30, -10], [30, 30, 10])
        clicks.append((tuple(centre + offset), bool(rng.random() < 0.7)))
    return clicks


def users_run(url: str, image: sitk.Image, users: int, clicks: int, options: Dict) -> Dict[str, float]:
    """``users`` threads, each opening a session and clicking as fast as it is answered; their latencies."""
    latencies: List[float] = []
    errors: List[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(users + 1)

    def user(number: int) -> None:
        try:
            session = RemoteSession(url, image, **options)
        except Exception as error:  # counted and reported, never hidden
            with lock:
                errors.append(f"open: {error}")
            ready.wait()
            return
        ready.wait()
        with session:
            for point_lps, positive in click_points(image, clicks, seed=number):
                started = time.perf_counter()
                try:
                    session.add_click(point_lps, positive)
                except Exception as error:  # counted and reported, never hidden
                    with lock:
                        errors.append(f"click: {error}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=user, args=(number,)) for number in range(users)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for message in errors[:5]:
        log(f"  error: {message}")
    return {
        "users": users, "clicks": len(latencies), "errors": len(errors),
        "median_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "throughput": len(latencies) / wall,
    }


def memory_run(network, device: str, image: sitk.Image, sessions: int, options: Dict) -> Dict[str, float]:
    """Opens ``sessions`` sessions (four clients at a time), clicks each once and leaves it; reports the
    server's resident memory before, at the most sessions open, and once all have expired."""
    app = create_app(network, device=device, max_sessions=sessions, idle_timeout_s=1.0, sweep_interval_s=0.1)
    registry = app.state.server.registry
    point_lps, _ = click_points(image, 1, seed=0)[0]
    with BackgroundServer(app) as server:
        RemoteSession(server.url, image, **options).add_click(point_lps)  # uploads the image; warms up
        gc.collect()
        before = resident_memory_bytes()
        most = [0, 0]
        counter = iter(range(sessions - 1))
        lock = threading.Lock()

        def client() -> None:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                RemoteSession(server.url, image, **options).add_click(point_lps)
                with lock:
                    open_now = len(registry)
                    if open_now > most[0]:
                        most[:] = [open_now, resident_memory_bytes()]

        started = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - started
        while len(registry):
            time.sleep(0.1)
        time.sleep(0.3)  # the sweep after the last expiry hands device memory back
        gc.collect()
        after = resident_memory_bytes()
        expired = app.state.server.metrics.sessions_expired.value()
    return {"sessions": sessions, "expired": expired, "seconds": elapsed, "before_mb": before / 2**20,
            "most_open": most[0], "at_most_mb": most[1] / 2**20, "after_mb": after / 2**20}


def make_network(name: str):
    return BallNet() if name == "stand-in" else load_network()


def report(rows: List[Dict], memory: List[Dict], machine: str, command: str, settings: str) -> str:
    lines = [
        f"Machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}.",
        f"Command: `{command}`. {settings}",
        "",
        "| network | device, precision | users | clicks | errors | median click (ms) | p95 click (ms) | clicks/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['network']} | {row['device']} | {row['users']} | {row['clicks']} | {row['errors']} | "
                     f"{row['median_ms']:.1f} | {row['p95_ms']:.1f} | {row['throughput']:.1f} |")
    lines += [
        "",
        "| network | sessions opened, clicked once, expired | took (s) | RSS before (MiB) | most open at once | "
        "RSS then (MiB) | RSS after expiry (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in memory:
        lines.append(f"| {row['network']} | {row['sessions']} ({row['expired']:.0f} expired) | {row['seconds']:.1f} | "
                     f"{row['before_mb']:.0f} | {row['most_open']} | {row['at_most_mb']:.0f} | {row['after_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=(*NETWORKS, "both"), default="stand-in")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--clicks", type=int, default=20, help="clicks per user")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions opened and left to expire")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cross-patch", choices=("on", "off"), default="on")
    parser.add_argument("--max-patches", type=int, default=4)
    parser.add_argument("--image", default="abdomen-ct-3mm", help="a CT folder of ../shared/data")
    parser.add_argument("--data", type=Path, default=shared_data())
    args = parser.parse_args(argv)
    image = sitk.ReadImage(str(args.data / args.image / "ct.nii.gz"))
    options = {"cross_patch": args.cross_patch == "on", "max_patches": args.max_patches}
    rows: List[Dict] = []
    memory: List[Dict] = []
    device_used = torch.device("cpu")
    for name in NETWORKS if args.network == "both" else (args.network,):
        network = make_network(name)
        app = create_app(network, device=args.device, max_sessions=max(args.users) + 1)
        server_state = app.state.server
        device_used = server_state.device
        described = f"{server_state.device}, {server_state.precision}"
        with BackgroundServer(app) as server:
            users_run(server.url, image, 1, 2, options)  # uploads the image and warms the network up
            for users in args.users:
                log(f"{name}: {users} user(s) x {args.clicks} clicks")
                rows.append({"network": name, "device": described, **users_run(server.url, image, users,
                                                                                args.clicks, options)})
        log(f"{name}: {args.sessions} sessions opened and left to expire")
        memory.append({"network": name, **memory_run(network, args.device, image, args.sessions, options)})
    command = "python -m bench.bench_server " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    settings = (f"CT: {args.image} {image.GetSize()}; cross-patch {args.cross_patch}, at most {args.max_patches} "
                "patches; clients and server in one process, on loopback.")
    print(report(rows, memory, machine_description(device_used), command.strip(), settings))
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

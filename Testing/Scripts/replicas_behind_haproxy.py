"""Two ``ctsam3d serve`` replicas behind HAProxy (Debian's ``haproxy`` package), checked end to end.

Sessions hold state, so a load balancer must send every request of a session to the replica that holds
it. HAProxy does that with a cookie it inserts in the first answer (``cookie ... insert``), which
``RemoteSession`` keeps like a browser; ``option redispatch`` sends a client whose replica is down to
another one, where its session is unknown (404) and ``RemoteSession`` re-creates it and replays its
clicks. This script shows both:

1. starts two replicas (the deterministic reference weights, float32 on the CPU) and HAProxy in front,
   all on loopback;
2. opens four sessions through HAProxy and clicks in each: they spread over both replicas, and each
   session's later requests reach its own replica (the replicas' session counts do not move);
3. stops one replica and clicks again in every session: all continue on the other replica;
4. checks every session's mask against a local ``InteractiveSession`` given the same clicks.

    apt-get install haproxy            # Debian/Ubuntu
    python Testing/Scripts/replicas_behind_haproxy.py [--data ../shared/data] [--keep]

It prints what it checked and exits non-zero on the first failure. About a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from CTSAM3DLib import InteractiveSession, load_checkpoint  # noqa: E402
from CTSAM3DLib.remote import RemoteSession, server_health  # noqa: E402

CT = "abdomen-ct-3mm"
HAPROXY_CONFIG = """\
global
    log stdout format raw local0 warning

defaults
    mode http
    log global
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    # A request whose replica is down goes to another one (its client then re-creates its session there).
    option redispatch
    retries 2

frontend ctsam3d
    bind 127.0.0.1:{frontend}
    default_backend replicas

backend replicas
    balance roundrobin
    # Session affinity: the replica's name in a cookie set on the first answer, sent back by the client.
    cookie CTSAM3D_REPLICA insert indirect nocache
    option httpchk GET /health
    default-server check inter 300ms fall 1 rise 1
    server a 127.0.0.1:{port_a} cookie a
    server b 127.0.0.1:{port_b} cookie b
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            server_health(url, timeout=2.0, retries=0)
            return
        except (ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing answered at {url} within {seconds:.0f} s") from None
            time.sleep(0.2)


def sessions_on(url: str) -> int:
    return int(server_health(url, retries=0)["sessions"])


def check(condition: bool, message: str) -> None:
    print(("ok    " if condition else "FAIL  ") + message, flush=True)
    if not condition:
        raise SystemExit(1)


@contextlib.contextmanager
def process(command: List[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            yield child
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder of the real CTs (default: ../shared/data beside the clone)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, haproxy.cfg)")
    args = parser.parse_args(argv)
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        parser.error("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)")
    image_path = args.data / CT / "ct.nii.gz"
    if not image_path.exists():
        parser.error(f"missing {image_path}: point --data at the shared CTs")
    work = Path(tempfile.mkdtemp(prefix="ctsam3d-replicas-"))
    ctsam3d = [sys.executable, "-m", "CTSAM3DLib.cli"]
    weights = work / "reference.pth"
    subprocess.run([*ctsam3d, "reference-weights", "--output", str(weights)], check=True, capture_output=True)
    ports = {"a": free_port(), "b": free_port()}
    frontend = free_port()
    (work / "haproxy.cfg").write_text(HAPROXY_CONFIG.format(frontend=frontend, port_a=ports["a"],
                                                            port_b=ports["b"]))
    replica_urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    balancer = f"http://127.0.0.1:{frontend}"
    image = sitk.ReadImage(str(image_path))
    size = np.array(image.GetSize(), dtype=np.float64)
    points = [image.TransformContinuousIndexToPhysicalPoint((size * fraction).tolist())
              for fraction in ((0.5, 0.5, 0.5), (0.4, 0.55, 0.5), (0.6, 0.45, 0.45), (0.5, 0.6, 0.55))]
    options = {"cross_patch": False}
    replicas: Dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as stack:
        for name, port in ports.items():
            replicas[name] = stack.enter_context(process(
                [*ctsam3d, "serve", "--weights", str(weights), "--port", str(port), "--device", "cpu",
                 "--precision", "float32"], work / f"replica-{name}.log"))
        stack.enter_context(process([haproxy, "-db", "-f", str(work / "haproxy.cfg")], work / "haproxy.log"))
        for url in (*replica_urls.values(), balancer):
            wait_for(url)
        time.sleep(1.0)  # until HAProxy's health checks (every 300 ms) have seen both replicas up
        print(f"two replicas ({', '.join(replica_urls.values())}) behind HAProxy at {balancer}", flush=True)

        sessions = [stack.enter_context(RemoteSession(balancer, image, **options)) for _ in points]
        for session, point in zip(sessions, points):
            session.add_click(point)
        counts = {name: sessions_on(url) for name, url in replica_urls.items()}
        check(counts == {"a": 2, "b": 2}, f"four sessions spread over both replicas: {counts}")
        for session, point in zip(sessions, points):
            session.add_click(np.add(point, (6.0, 0.0, 0.0)), positive=False)
        after = {name: sessions_on(url) for name, url in replica_urls.items()}
        check(after == counts, f"every session's next click reached its own replica: {after}")

        replicas["a"].terminate()
        replicas["a"].wait(30)
        time.sleep(1.0)  # HAProxy's health check marks the replica down
        for session, point in zip(sessions, points):
            session.add_click(np.add(point, (0.0, 6.0, 0.0)))
        check(sessions_on(replica_urls["b"]) == 4,
              "with replica a stopped, its two sessions continue on replica b (re-created, clicks replayed)")

        network = load_checkpoint(str(weights), device="cpu")
        for number, session in enumerate(sessions, start=1):
            local = InteractiveSession(network, image, device="cpu", precision="float32", **options)
            local.set_clicks([(click.point_lps, click.positive) for click in session.clicks])
            check(np.array_equal(local.mask_array(), session.mask_array()),
                  f"session {number}: its mask through the balancer equals a local session's "
                  f"({int(session.mask_array().sum())} voxels, {len(session.clicks)} clicks)")
    if args.keep:
        print(f"logs and haproxy.cfg kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

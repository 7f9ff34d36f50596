"""The server's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Written here rather than with ``prometheus_client``: a dozen series do not justify a dependency.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from starlette.routing import Match

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the histograms' buckets: from a cached-mask answer to a CPU server's
cross-patch click behind a queue."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Gauge(NamedTuple):
    """A value read when the metrics are written."""

    name: str
    help: str
    value: float


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(str(value))}"' for name, value in zip(names, values)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonic count per combination of label values."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._values: Dict[Tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, label_values: Sequence[str] = (), amount: float = 1.0) -> None:
        key = tuple(str(v) for v in label_values)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, label_values: Sequence[str] = ()) -> float:
        with self._lock:
            return self._values.get(tuple(str(v) for v in label_values), 0.0)

    def lines(self) -> List[str]:
        with self._lock:
            values = sorted(self._values.items()) or ([((), 0.0)] if not self.labels else [])
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"] + [
            f"{self.name}{_labels(self.labels, key)} {_number(value)}" for key, value in values
        ]


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count, per label values."""

    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS_S) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: Dict[Tuple[str, ...], List[float]] = {}
        """Per label values: a count per bucket (not yet cumulative), then the sum."""
        self._lock = threading.Lock()

    def observe(self, value: float, label_values: Sequence[str] = ()) -> None:
        key = tuple(str(v) for v in label_values)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 1))
            series[next(i for i, bound in enumerate(self.buckets) if value <= bound)] += 1
            series[-1] += value

    def lines(self) -> List[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((key, list(series)) for key, series in self._series.items())
        for key, series in items:
            cumulative = 0.0
            for bound, count in zip(self.buckets, series):
                cumulative += count
                bucket = _labels(self.labels, key, 'le="' + _number(bound) + '"')
                out.append(f"{self.name}_bucket{bucket} {_number(cumulative)}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(series[-1])}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {_number(cumulative)}")
        return out


class Metrics:
    """Everything ``GET /metrics`` reports, besides the gauges read at that moment."""

    def __init__(self) -> None:
        self.requests = Counter("ctsam3d_requests_total", "HTTP requests answered, by route, method and status.",
                                ("route", "method", "status"))
        self.latency = Histogram("ctsam3d_request_duration_seconds",
                                 "Time from a request's arrival to its answer, by route and method.",
                                 ("route", "method"))
        self.queue_wait = Histogram("ctsam3d_queue_wait_seconds",
                                    "Time a job waited for the network worker, by job kind.", ("job",))
        self.job_duration = Histogram("ctsam3d_job_duration_seconds",
                                      "Time a job held the network worker, by job kind.", ("job",))
        self.sessions_created = Counter("ctsam3d_sessions_created_total", "Sessions opened.")
        self.sessions_expired = Counter("ctsam3d_sessions_expired_total",
                                        "Sessions closed by the server after their idle timeout.")
        self.sessions_closed = Counter("ctsam3d_sessions_closed_total", "Sessions closed by their client.")

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc((route, method, status))
        self.latency.observe(seconds, (route, method))

    def render(self, gauges: Iterable[Gauge]) -> str:
        lines: List[str] = []
        for gauge in gauges:
            lines += [f"# HELP {gauge.name} {gauge.help}", f"# TYPE {gauge.name} gauge",
                      f"{gauge.name} {_number(gauge.value)}"]
        for metric in (self.requests, self.latency, self.queue_wait, self.job_duration, self.sessions_created,
                       self.sessions_expired, self.sessions_closed):
            lines += metric.lines()
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> Optional[int]:
    """This process's resident memory now (Linux: /proc/self/status VmRSS), or None where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
"""The methods metrics name; any other is counted as "other" (made-up methods made 213 MB of metrics)."""


class RequestMetrics:
    """ASGI middleware: each answered request's latency and status, labelled by route template (never by
    the path itself, which holds session ids) and method (one of ``KNOWN_METHODS`` or "other")."""

    def __init__(self, app: Any, metrics: Metrics, routes: Callable[[], Sequence[Any]]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def record_status(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            self.metrics.observe_request(self._route(scope), method, status[0], time.perf_counter() - started)

    def _route(self, scope: Dict[str, Any]) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"

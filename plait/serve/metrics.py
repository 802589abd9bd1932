"""Prometheus metrics in the text exposition format, without a client library.

The server needs a handful of counters and histograms; writing the format (version 0.0.4) is
a few lines, and keeps one more dependency out of the install. `ServerMetrics` names what is
measured; `render()` is what `GET /metrics` returns.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

Labels = tuple[tuple[str, str], ...]

#: Request latency buckets in seconds: a cached answer takes milliseconds, a long CPU
#: generation minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(labels)} {_number(value)}"


class Histogram:
    def __init__(self, name: str, help_: str, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.help = name, help_
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list[float]] = {}  # bucket counts..., +Inf count, sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += 1
            series[-1] += value

    def count(self, **labels: str) -> float:
        series = self._series.get(tuple(sorted(labels.items())))
        return 0.0 if series is None else series[-2]

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            for bound, count in zip(self.buckets, series):
                yield f"{self.name}_bucket{_labels(labels, (('le', _number(bound)),))} {_number(count)}"
            yield f"{self.name}_bucket{_labels(labels, (('le', '+Inf'),))} {_number(series[-2])}"
            yield f"{self.name}_sum{_labels(labels)} {_number(series[-1])}"
            yield f"{self.name}_count{_labels(labels)} {_number(series[-2])}"


class Gauge:
    """A value read when scraped (queue lengths, calls in flight)."""

    def __init__(self, name: str, help_: str, read: Callable[[], Iterable[tuple[Labels, float]]]):
        self.name, self.help, self.read = name, help_, read

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, value in self.read():
            yield f"{self.name}{_labels(labels)} {_number(value)}"


class ServerMetrics:
    """Everything `/metrics` reports. Counters are updated by the request path; gauges are
    read from the engines and the admission gate at scrape time."""

    def __init__(self) -> None:
        self.requests = Counter(
            "plait_http_requests_total", "HTTP requests answered, by route, method and status."
        )
        self.latency = Histogram(
            "plait_http_request_duration_seconds",
            "Time from request to the last byte of the answer, by route.",
        )
        self.errors = Counter(
            "plait_http_errors_total", "Requests answered with status >= 400, by route and status."
        )
        self.program_calls = Counter("plait_program_calls_total", "Program calls, by program and outcome.")
        self.program_latency = Histogram(
            "plait_program_call_duration_seconds", "Program call time, by program."
        )
        self.tokens = Counter(
            "plait_tokens_total", "Tokens processed, by model and kind (prompt, completion)."
        )
        self.gauges: list[Gauge] = []

    def add_gauge(self, name: str, help_: str, read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        self.gauges.append(Gauge(name, help_, read))

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self.tokens.inc(prompt, model=model, kind="prompt")
        if completion:
            self.tokens.inc(completion, model=model, kind="completion")

    def render(self) -> str:
        metrics: list = [
            self.requests,
            self.latency,
            self.errors,
            self.program_calls,
            self.program_latency,
            self.tokens,
            *self.gauges,
        ]
        return "\n".join(line for metric in metrics for line in metric.lines()) + "\n"


class MetricsMiddleware:
    """Counts every HTTP request and times it to its last byte (streams included).

    Outermost, so rejections by the auth, rate and size layers are counted too. The route
    label is the matched route's template (`/v1/programs/{name}`), never the raw path, so
    label cardinality stays bounded.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app dies before answering, the server answers 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or (
                scope["path"] if scope["path"] in ("/healthz", "/metrics") else "unmatched"
            )
            labels = {"route": route, "method": scope["method"], "status": str(status)}
            self.metrics.requests.inc(**labels)
            self.metrics.latency.observe(time.perf_counter() - started, route=route)
            if status >= 400:
                self.metrics.errors.inc(route=route, status=str(status))

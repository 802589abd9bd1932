"""Per-client rate limit and admission control (back-pressure); the body-size limit is
`plait.http_guard.BodySizeLimit`, shared with the index server.

Each answers at once with a JSON error instead of letting work pile up:

- `RateLimiter`: a token bucket per client; 429 with `Retry-After` when a client's bucket is
  empty.
- `AdmissionGate`: at most `capacity` generation calls in flight; the next one gets 503 with
  `Retry-After` rather than waiting in an unbounded queue. (The engine has its own queue
  bound too; its `EngineOverloadedError` also becomes 503.)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections.abc import Iterator

from starlette.types import ASGIApp, Receive, Scope, Send

from plait.http_guard import PUBLIC_PATHS, bearer_token
from plait.serve.errors import ApiError, error_response


class RateLimiter:
    """Token buckets: each client may send `burst` requests at once and `rate` per second."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000):
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> float | None:
        """Take one token for `client`; None if allowed, else seconds until one is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                if len(self._buckets) > self.max_clients:
                    self._forget_idle(now)
                return None
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        """Drop clients whose bucket has refilled: they are indistinguishable from new ones."""
        full = [
            c
            for c, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.burst
        ]
        for client in full:
            del self._buckets[client]


def client_identity(scope: Scope) -> str:
    """Who a request is from, for rate limiting: its API key (hashed), else its address."""
    token = bearer_token(scope)
    if token is not None:
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:unknown"


class RateLimit:
    """ASGI middleware applying a `RateLimiter` to every path but the health probe."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter | None):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limiter is not None and scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            wait = self.limiter.retry_after(client_identity(scope))
            if wait is not None:
                seconds = max(1, math.ceil(wait))
                response = error_response(
                    429,
                    f"rate limit exceeded: retry in {seconds} s",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    {"Retry-After": str(seconds)},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class AdmissionGate:
    """Counts the engine sequences of the calls in flight (a program call is one; an OpenAI
    call is its prompts times `n`); refuses a call that would go over `capacity` with 503, and
    one that alone asks for more than `capacity` with 400.

    Used from the event loop and from worker threads alike, so it takes a lock.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.inflight = 0
        self.rejected = 0
        self._lock = threading.Lock()

    def enter(self, sequences: int = 1) -> None:
        if sequences > self.capacity:
            raise ApiError(
                400,
                f"the call asks for {sequences} generations (prompts x n); this server runs at most "
                f"{self.capacity} at once",
                "invalid_request_error",
                "too_many_generations",
            )
        with self._lock:
            if self.inflight + sequences > self.capacity:
                self.rejected += 1
                raise ApiError(
                    503,
                    f"the server is busy ({self.inflight} calls in flight): retry later",
                    "overloaded_error",
                    "server_overloaded",
                    {"Retry-After": "1"},
                )
            self.inflight += sequences

    def leave(self, sequences: int = 1) -> None:
        with self._lock:
            self.inflight -= sequences

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

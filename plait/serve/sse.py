"""Server-sent events: the wire format, and a stream that releases what it holds exactly once.

`GuardedStream` exists because Starlette does not always close a response's body iterator:
if the client disconnects before the first chunk, the generator never starts and its
`finally` never runs. Whatever the stream holds (an admission slot) is released by whichever
comes first: the end of the stream, an error, an explicit close, or garbage collection.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

#: Response headers for an SSE stream (no proxy buffering, no caching).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any, event: str | None = None) -> str:
    """One SSE message; `data` is sent as compact JSON unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in payload.split("\n"))
    return "\n".join(lines) + "\n\n"


class _Once:
    def __init__(self, fn: Callable[[], None]):
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class GuardedStream:
    """An async iterator over `source` that calls `release` once when it is done with."""

    def __init__(self, source: AsyncIterator[str], release: Callable[[], None]):
        self._source = source
        self._release = _Once(release)
        weakref.finalize(self, self._release)

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._source.__anext__()
        except BaseException:  # StopAsyncIteration included: the stream is over
            self._release()
            raise

    async def aclose(self) -> None:
        try:
            close = getattr(self._source, "aclose", None)
            if close is not None:
                await close()
        finally:
            self._release()

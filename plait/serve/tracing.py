"""Every served call is traced to the store, off the request path.

A request handler builds a `Trace` and hands it to `TraceWriter.submit`, which only enqueues
it; one background thread writes traces to the store (`Store.record_trace`). A slow or broken
database therefore never slows an answer or fails a request: when the queue is full, or a
trace cannot be prepared or written, it is counted as dropped and logged, and the writer goes
on to the next one. A trace holds what clients sent, so nothing about it may stop the writer:
values are copied with bounded depth and length (`jsonable`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Longest text kept per traced value; a trace records a call, not a copy of every payload.
MAX_TRACED_CHARS = 20_000

#: Deepest nesting of lists and objects kept in a traced value; deeper parts become a marker.
MAX_TRACED_DEPTH = 32


class TraceStore(Protocol):
    """What the writer needs from `plait.store.Store`."""

    def record_trace(
        self,
        program: str,
        inputs: dict[str, Any],
        outputs: dict[str, Any] | None,
        latency_ms: float,
        status: str,
        tokens: int = 0,
        *,
        error: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        request_id: str | None = None,
    ) -> int: ...


@dataclass
class Trace:
    """One served call. `target` is the program name, or `openai:<endpoint>` for engine calls."""

    target: str
    request_id: str
    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    status: str
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def jsonable(value: Any, limit: int = MAX_TRACED_CHARS, depth: int = MAX_TRACED_DEPTH) -> Any:
    """`value` as plain JSON for a trace column: long strings cut, unknown objects as text,
    lists and objects more than `depth` levels deep replaced by a short marker (a client's
    body can nest thousands of levels: copying it recursively would overflow the stack)."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... [{len(value) - limit} more chars]"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (dict, list, tuple)) and depth <= 0:
        return f"[nested deeper than {MAX_TRACED_DEPTH} levels]"
    if isinstance(value, dict):
        return {str(k): jsonable(v, limit, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, limit, depth - 1) for v in value]
    dump = getattr(value, "model_dump", None)  # pydantic models (DSPy typed outputs)
    if callable(dump):
        return jsonable(dump(mode="json"), limit, depth)
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return jsonable(str(value), limit)


class TraceWriter:
    """A bounded queue of traces and the thread that writes them."""

    def __init__(self, store: TraceStore | None, *, capacity: int = 10_000, record_io: bool = True):
        self.store = store
        self.record_io = record_io
        self.written = 0
        self.dropped = 0
        self._dropped_lock = threading.Lock()  # counted by request threads and the writer
        self._queue: queue.Queue[Trace | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        if store is not None:
            self._thread = threading.Thread(target=self._run, name="plait-trace-writer", daemon=True)
            self._thread.start()

    def submit(self, trace: Trace) -> None:
        """Queue a trace; never blocks."""
        if self.store is None:
            return
        try:
            self._queue.put_nowait(trace)
        except queue.Full:
            self._count_drop()
            log.warning("trace queue full: dropped the trace of request %s", trace.request_id)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued trace is written (tests, shutdown). True if it emptied."""
        if self._thread is None:
            return True
        done = threading.Event()
        waiter = threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        waiter.start()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self.flush(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            return
        self._thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            trace = self._queue.get()
            try:
                if trace is None:
                    return
                self._write(trace)
            except Exception:  # the database is down or full, or the trace is unusable: keep going
                self._count_drop()
                log.exception("could not write the trace of request %s", getattr(trace, "request_id", "?"))
            finally:
                self._queue.task_done()

    def _count_drop(self) -> None:
        with self._dropped_lock:
            self.dropped += 1

    def _write(self, trace: Trace) -> None:
        assert self.store is not None
        inputs = jsonable(trace.inputs) if self.record_io else {"fields": sorted(trace.inputs)}
        outputs = None
        if trace.outputs is not None:
            outputs = jsonable(trace.outputs) if self.record_io else {"fields": sorted(trace.outputs)}
        self.store.record_trace(
            trace.target,
            inputs,
            outputs,
            trace.latency_ms,
            trace.status,
            trace.prompt_tokens + trace.completion_tokens,
            error=trace.error,
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=trace.completion_tokens,
            request_id=trace.request_id,
        )
        self.written += 1

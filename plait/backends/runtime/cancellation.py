"""Cancelling, together, every engine request made inside a block of code.

A served program is DSPy code running in a worker thread; its LM calls reach the engine
through plait's DSPy bridge, one `Engine.submit` at a time. When its client goes away, the
server must stop all of them, including the ones the program has not made yet:

    with CancelScope() as scope:      # in the worker thread, around the program
        program(**inputs)             # every Engine.submit in here registers with `scope`
    scope.cancel()                    # from any thread: in-flight requests stop, and the
                                      # next submit raises RequestCancelledError

The scope is a context variable, so it follows the code that entered it (its thread, or the
asyncio task), not the objects it touches.
"""

import contextvars
import threading
from types import TracebackType
from typing import Protocol

from plait.errors import RequestCancelledError


class Releasable(Protocol):
    """An engine request as a scope sees it: given up with `release()` (cancelled once every
    caller sharing it has given it up)."""

    @property
    def done(self) -> bool: ...

    def release(self) -> None: ...


_current: contextvars.ContextVar["CancelScope | None"] = contextvars.ContextVar(
    "plait_cancel_scope", default=None
)


def current_scope() -> "CancelScope | None":
    return _current.get()


class CancelScope:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[Releasable] = []
        self._cancelled = False
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "CancelScope":
        self._token = _current.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        _current.reset(self._token)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        """Raise `RequestCancelledError` once the scope is cancelled."""
        if self._cancelled:
            raise RequestCancelledError("the request was cancelled (its client went away)")

    def register(self, request: Releasable) -> None:
        """Track a submitted request; give it up at once if the scope is already cancelled."""
        with self._lock:
            self._running = [r for r in self._running if not r.done]
            self._running.append(request)
            cancelled = self._cancelled
        if cancelled:
            request.release()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            running, self._running = self._running, []
        for request in running:
            request.release()

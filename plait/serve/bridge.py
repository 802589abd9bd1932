"""Blocking work (DSPy programs, engine waits) awaited from the event loop.

The engine batches whatever is submitted concurrently, so the server's job is to have many
calls waiting at once without blocking the event loop: each runs on a worker thread, and the
loop awaits its future.

Two rules keep accounting honest when a client gives up or a call times out:
- a call, once queued, always runs to its end (the future is shielded from cancellation), so
  whatever it holds (an admission slot) is released by the call itself, exactly once, when its
  work is over;
- a thread cannot be stopped, but its engine requests can: a client that leaves
  (`unless_client_leaves`) or a timeout cancels them, through their handles (OpenAI calls) or
  through the `CancelScope` the call runs in (`ScopedRun`, program calls), and the call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from plait.backends.runtime.cancellation import CancelScope
from plait.errors import RequestCancelledError
from plait.serve.errors import ApiError

T = TypeVar("T")

_DONE = object()

#: The error code of a call whose client went away before its answer (status 499).
CLIENT_CLOSED = "client_closed_request"


class WorkerPool:
    """A bounded thread pool for blocking calls, awaited with a deadline."""

    def __init__(self, workers: int, name: str = "plait-serve"):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    async def run(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` on a worker and return its result; 504 after `timeout` seconds."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise ApiError(
                504, f"the call did not finish within {timeout:g} s", "timeout_error", "request_timeout"
            ) from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=False)


async def unless_client_leaves(request: Request, work: Awaitable[T], on_leave: Callable[[], None]) -> T:
    """`await work`, unless the client disconnects first: then `on_leave()` (stop the work),
    wait for the work to end, and answer 499 (nobody reads it; the metrics count it).

    For handlers whose body is already read: what arrives next from the client is its
    disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    on_leave()
    with contextlib.suppress(Exception):  # the work ends as it may: nobody gets its answer
        await task
    raise client_closed()


def client_closed() -> ApiError:
    """The answer to a call whose client went away (nobody reads it; metrics and traces do)."""
    return ApiError(499, "the client closed the request", "invalid_request_error", CLIENT_CLOSED)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ScopedRun:
    """A program call's work, run in a worker thread inside a `CancelScope`, that the server
    stops from any thread with `cancel()`: every engine request the program made is cancelled,
    and any it makes later raises `RequestCancelledError`, so the program ends.

    `release` (the admission slot) runs exactly once, when the work can do nothing more: after
    it returns or raises, or at `cancel()` if it had not started (it then never starts).
    """

    def __init__(self, release: Callable[[], None]):
        self.scope = CancelScope()
        self._release = release
        self._lock = threading.Lock()
        self._state = "pending"  # -> "running" -> "over"; or "pending" -> "over" by cancel()

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the scope (on the worker thread that is to run it)."""
        with self._lock:
            if self._state != "pending":
                raise RequestCancelledError("the call was cancelled before it started")
            self._state = "running"
        try:
            with self.scope:
                return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._state = "over"
            self._release()

    def cancel(self) -> None:
        self.scope.cancel()
        with self._lock:
            never_ran = self._state == "pending"
            if never_ran:
                self._state = "over"
        if never_ran:
            self._release()


async def iterate_in_thread(
    iterator: Iterator[T], *, on_close: Callable[[], None] | None = None
) -> AsyncIterator[T]:
    """Items of a blocking iterator, produced by a thread of its own and awaited here.

    A dedicated thread (not the worker pool) so a stream never waits behind queued calls.
    `on_close` runs when the consumer stops early (client gone): e.g. cancel the engine
    request, which also ends the producing thread.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: object, error: BaseException | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            return True
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item, None):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_DONE, exc)
            return
        put(_DONE, None)

    thread = threading.Thread(target=produce, name="plait-stream", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item, error = await queue.get()
            if item is _DONE:
                finished = True
                if error is not None:
                    raise error
                return
            yield item
    finally:
        if not finished and on_close is not None:
            on_close()

"""Coalesce concurrent query encodings into one forward pass.

Many threads (server requests, DSPy's parallel evaluation) each encode one short query; on a
CPU, one batched forward of 16 queries costs far less than 16 separate ones competing for the
same cores. A single worker thread takes whatever is queued - without waiting for more, so
a lone client pays no extra latency - encodes it as one batch and hands each caller its row.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    def __init__(self, fn: Callable[[list[In]], Sequence[Out]], max_batch: int = 32, name: str = "batcher"):
        self._fn = fn
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[In, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Out:
        """Block until `item`'s result is ready; exceptions from `fn` are re-raised here."""
        future: Future = Future()
        self._queue.put((item, future))
        return future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                outputs = self._fn([item for item, _ in batch])
                for (_, future), out in zip(batch, outputs, strict=True):
                    future.set_result(out)
            except BaseException as exc:  # hand the failure to every waiting caller
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            if stop:
                return

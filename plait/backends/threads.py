"""Keep PyTorch's CPU thread teams from crowding the scheduler's.

PyTorch's CPU kernels run on OpenMP (the wheel's libgomp), which gives every thread that ever
runs a parallel op its own team of worker threads, kept until that thread ends. While no more
workers exist than cores, idle workers spin between parallel regions and wake at once; with
more, libgomp throttles the spinning and puts them to sleep, and a decode step — hundreds of
small parallel ops — runs about 1.6x slower (SmolLM2 int4 on 2 cores: 18.3 ms a token with the
loading thread's team alive, 11.3 ms without). The scheduler thread runs the model; torch work
the engine does elsewhere (loading, reference logits) runs on a thread whose team ends with it.
"""

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends when it returns; exceptions propagate."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller
            error.append(exc)

    worker = threading.Thread(target=target, name="plait-torch-work")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]

"""Keep PyTorch's CPU thread teams from crowding the scheduler's.

PyTorch's CPU kernels run on OpenMP (the wheel's libgomp), which gives every thread that ever
runs a parallel op its own team of worker threads, kept until that thread ends. While no more
workers exist than cores, idle workers spin between parallel regions and wake at once; with
more, libgomp throttles the spinning and puts them to sleep, and a decode step — hundreds of
small parallel ops — runs about 1.6x slower (SmolLM2 int4 on 2 cores: 18.3 ms a token with the
loading thread's team alive, 11.3 ms without). The scheduler thread runs the model; torch work
the engine does elsewhere (loading, reference logits) runs on a thread whose team ends with it.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread that ends when it returns; exceptions propagate.
    (Leaving the one-worker executor joins its thread, and its OpenMP team goes with it.)"""
    with ThreadPoolExecutor(1, thread_name_prefix="plait-torch-work") as pool:
        return pool.submit(fn, *args, **kwargs).result()

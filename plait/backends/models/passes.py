"""What kind of tokens a forward pass computes: prompt tokens, or generated ones.

A model may run the two on different code (the int4 embedded model: prompt tokens on dense bf16
weights, generated tokens on 4-bit ones, see `plait.backends.loading.quant`). The scheduler
says which by opening `prompt_pass()` around a prompt chunk's pass; the choice is per thread, so
a caller scoring text while the scheduler decodes is not moved.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pass_kind = threading.local()


@contextmanager
def prompt_pass() -> Iterator[None]:
    """Within it, the calling thread's passes compute prompt tokens."""
    outer = in_prompt_pass()
    _pass_kind.prompt = True
    try:
        yield
    finally:
        _pass_kind.prompt = outer


def in_prompt_pass() -> bool:
    return getattr(_pass_kind, "prompt", False)

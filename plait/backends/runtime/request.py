"""A generation request as its caller holds it: what was asked and, as it runs, the results.

`Engine.submit` returns a `Request` at once; the caller waits on it (`wait()`), reads its
stream (`deltas()`) or gives up on it (`cancel()`). Only the scheduler thread writes the
results, through `publish` and `finish`; what the scheduler keeps for itself while the request
runs (tokens not yet in the cache, the detokenizer, the random generator) lives in its
`Sequence` (plait.backends.runtime.sequence), not here.
"""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from plait.backends.grammar.constraint import TokenConstraint
from plait.backends.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class Prefill:
    """How a prefill-only request runs. `pin`: its blocks stay in the prefix cache, never
    evicted (a served program's static prompt prefixes). `background`: it computes only while
    no generation request runs or waits, a few blocks a pass, so it fills idle time without
    delaying anyone by more than one such pass (a later stage's prompt, prefilled as soon as
    part of it is known)."""

    pin: bool = False
    background: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sampled_tokens: int = 0
    forced_tokens: int = 0
    forward_passes: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not computed
    drafted_tokens: int = 0  # tokens guessed by speculative decoding and fed for verification
    accepted_tokens: int = 0  # of those, the ones the model agreed with (kept in the output)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Request:
    """A generation request and, once done, its result. Read the results after `wait()`."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        constraint: TokenConstraint | None = None,
        stream: bool = False,
        prefill: Prefill | None = None,
    ):
        self.prompt_ids, self.params, self.constraint, self.stream = prompt_ids, params, constraint, stream
        #: a prefill-only request (`Engine.prefill`): its prompt goes into the prefix cache and
        #: nothing is generated
        self.prefill = prefill
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.usage = Usage(prompt_tokens=len(prompt_ids))
        self._cancelled = False
        self._holders = 1
        self._holders_lock = threading.Lock()
        self._done = threading.Event()
        self._deltas: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    # ---- the caller's side ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def wait(self, timeout: float | None = None) -> "Request":
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self

    def deltas(self) -> Iterator[str]:
        """Text pieces as they are generated (for `stream=True` requests)."""
        while (piece := self._deltas.get()) is not None:
            yield piece
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop generating: the scheduler frees the request's slot at its next step."""
        self._cancelled = True

    def hold(self) -> None:
        """One more caller shares this request (an identical one joined it in flight)."""
        with self._holders_lock:
            self._holders += 1

    def release(self) -> None:
        """One caller gives the request up (its client went away); it is cancelled when no
        caller is left, so a shared request keeps running for the others."""
        with self._holders_lock:
            self._holders -= 1
            last = self._holders <= 0
        if last:
            self.cancel()

    # ---- the scheduler's side -----------------------------------------------------------------
    def publish(self, piece: str) -> None:
        """Text that can no longer change, for a streaming caller."""
        if self.stream and piece:
            self._deltas.put(piece)

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """The request is over (once: later calls are ignored); waiting callers wake up."""
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        if self.stream:
            self._deltas.put(None)
        self._done.set()

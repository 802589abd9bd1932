"""One thread owns the model; callers submit requests and wait on them.

Every running sequence sits in a slot of the `StatePool` (slots 0..N-1, kept compact) and has
`pending` tokens not yet in its cache: the prompt at first, then the token it just sampled,
plus any tokens a grammar forces after it. Each iteration of the loop:

* rows with one pending token are decoded together, one forward pass per contiguous run of
  slots (normally a single pass for the whole batch: continuous batching);
* rows with several pending tokens (a prompt, or a forced span) get a multi-token pass of up
  to `prefill_chunk` tokens — chunked prefill, interleaved with the other rows' decoding;
* a row whose pending tokens are all in the cache samples its next token from the last logits.

New requests join at the next iteration; finished ones leave their slot, and the last row
moves into the hole. A full queue raises `EngineOverloadedError` (back-pressure); a request
that can never fit the memory budget fails with `MemoryBudgetError` without touching others.
"""

import atexit
import logging
import queue
import random
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch

from plait.backends.grammar.constraint import TokenConstraint, apply_masks
from plait.backends.loading.tokenizer import Tokenizer
from plait.backends.models.base import CausalLM
from plait.backends.models.state import Batch
from plait.backends.runtime.cuda_graphs import DecodeGraphs
from plait.backends.runtime.prefix_cache import PrefixCache, block_hashes
from plait.backends.runtime.sampling import SamplingParams, sample
from plait.backends.runtime.state_pool import StatePool
from plait.errors import EngineClosedError, EngineOverloadedError, MemoryBudgetError, PlaitError

log = logging.getLogger(__name__)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sampled_tokens: int = 0
    forced_tokens: int = 0
    forward_passes: int = 0
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Request:
    """A generation request and, once done, its result. Callers read it after `wait()`."""

    prompt_ids: list[int]
    params: SamplingParams
    constraint: TokenConstraint | None = None
    stream: bool = False
    # ---- results ----
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    usage: Usage = field(default_factory=Usage)
    # ---- scheduler-private ----
    pending: list[int] = field(default_factory=list, repr=False)
    block_hashes: list[int] = field(default_factory=list, repr=False)
    cached: int = 0
    emitted: int = 0
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _deltas: "queue.SimpleQueue[str | None]" = field(default_factory=queue.SimpleQueue, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    def wait(self, timeout: float | None = None) -> "Request":
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        return self

    def deltas(self):
        """Text pieces as they are generated (for `stream=True` requests)."""
        while (piece := self._deltas.get()) is not None:
            yield piece
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


_live: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()


@atexit.register
def _close_live_schedulers() -> None:
    """Stop every scheduler thread before the interpreter tears down: a daemon thread still
    inside a torch op at exit aborts the whole process (`terminate called ...`)."""
    for scheduler in list(_live):
        scheduler.close()


class Scheduler:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        pool: StatePool,
        max_batch_size: int = 32,
        max_queue: int = 1024,
        prefill_chunk: int = 512,
        prefix_cache: PrefixCache | None = None,
    ):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.prefix_cache = prefix_cache
        self.prompt_tokens_computed = 0
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.device = next(model.parameters()).device
        self.decode_graphs = DecodeGraphs.for_device(model, pool)  # None off CUDA
        self.padded_passes = True  # see _multi_token_groups; False: one row per pass (for comparison)
        self.rows: list[Request] = []  # rows[i] lives in slot i
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="plait-scheduler", daemon=True)
        self.thread.start()
        _live.add(self)

    # ---- callers' side -----------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        if request.params.seed is not None:
            request._generator = torch.Generator().manual_seed(request.params.seed)
        elif not request.params.greedy:
            request._generator = torch.Generator().manual_seed(random.getrandbits(63))
        request.pending = list(request.prompt_ids)
        if request.constraint is not None:
            # what the grammar forces before anything is sampled joins the prompt's prefill
            forced = request.constraint.forced()
            if forced:
                request.constraint.advance(forced)
                request.pending += forced
                request.token_ids = list(forced)
                request.usage.forced_tokens = len(forced)
        if self.prefix_cache is not None:
            request.block_hashes = block_hashes(request.prompt_ids, self.prefix_cache.block_size)
        request.usage.prompt_tokens = len(request.prompt_ids)
        with self.cond:
            if self.closed:
                raise EngineClosedError("the engine is closed")
            if len(self.waiting) >= self.max_queue:
                raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting: retry later")
            self.waiting.append(request)
            self.cond.notify()
        return request

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ---- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.rows and not self.waiting:
                    self.cond.wait()
                if self.closed:
                    break
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a bug or an OOM: fail the running requests, keep serving
                log.exception("engine step failed")
                for row in list(self.rows):
                    self._finish(row, "error", exc)
        for row in list(self.rows) + list(self.waiting):
            self._finish(row, "error", EngineClosedError("the engine was closed"), release=False)

    def _admit(self) -> None:
        deferred: list[Request] = []
        while self.waiting and len(self.rows) < self.max_batch_size:
            request = self.waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled", release=False)
                continue
            restorable = 0
            if self.prefix_cache is not None:
                restorable = self.prefix_cache.match(request.prompt_ids, request.block_hashes)
                if self._prefix_in_flight(request) > restorable:
                    deferred.append(request)  # a running prefill is computing this prefix: reuse it
                    continue
            length = len(request.prompt_ids) + request.params.max_tokens
            try:
                self.pool.reserve(len(self.rows) + 1, min(length, self.pool.max_length))
            except MemoryBudgetError as exc:
                if self.rows:  # others will finish and free room: wait (back-pressure)
                    self.waiting.appendleft(request)
                    break
                self._finish(request, "error", exc, release=False)
                continue
            slot = len(self.rows)
            self.pool.clear(slot)
            if restorable:
                self.prefix_cache.restore(request.block_hashes, restorable, self.pool, slot)
                request.cached, request.usage.cached_tokens = restorable, restorable
                del request.pending[:restorable]
            self.rows.append(request)
        self.waiting.extendleft(reversed(deferred))

    def _prefix_in_flight(self, request: Request) -> int:
        """Tokens of `request`'s prompt that a row still in its prefill shares, block-aligned."""
        best = 0
        for row in self.rows:
            if row.cached >= len(row.prompt_ids):
                continue
            shared = 0
            for mine, theirs in zip(request.block_hashes, row.block_hashes):
                if mine != theirs:
                    break
                shared += 1
            best = max(best, shared * self.prefix_cache.block_size)
        return min(best, len(request.prompt_ids) - 1)

    @torch.inference_mode()
    def _step(self) -> None:
        self.steps += 1
        for row in [r for r in self.rows if r.cancelled]:
            self._finish(row, "cancelled")
        # multi-token passes: prompts (chunked) and forced spans
        for slots, chunks in self._multi_token_groups():
            self._multi_token_pass(slots, chunks)
        # decode: every row with exactly one pending token, per contiguous run of slots
        run: list[int] = []
        for slot, row in enumerate(self.rows + [None]):
            if row is not None and len(row.pending) == 1 and row.cached > 0:
                run.append(slot)
                continue
            if run:
                self._decode_run(run)
                run = []
        # single-token prompts (no cache yet) and anything else with one token left
        for slot, row in enumerate(self.rows):
            if len(row.pending) == 1 and row.cached == 0:
                logits = self._forward(slot, [row], torch.tensor([row.pending], device=self.device))
                self._consumed(row, 1)
                self._next_token(row, logits[0, -1])
        for row in [r for r in self.rows if r.finish_reason is not None]:
            self._release(row)

    def _multi_token_groups(self) -> list[tuple[list[int], list[list[int]]]]:
        """The rows with more than one pending token, with this step's chunk of each, grouped
        into passes. Prompts that arrive together are prefilled in one pass, each row padded on
        the right to the longest (a matmul over many rows uses the cores better than many small
        ones). Padding never reaches a row's state: attention writes its keys past the row's end
        where nothing reads them, and Mamba layers give it dt = 0 and end the conv history at
        the row's last real token (`Batch.new_tokens`), so hybrids batch prompts too. A group
        is contiguous slots and stops before padding would exceed a quarter of the pass or the
        keys would run past the pool's capacity."""
        groups: list[tuple[list[int], list[list[int]]]] = []
        for slot, row in enumerate(self.rows):
            if len(row.pending) <= 1:
                continue
            chunk = row.pending[: self._pass_length(row)]
            if groups and self.padded_passes and groups[-1][0][-1] == slot - 1:
                slots, chunks = groups[-1]
                width = max(len(chunk), *(len(c) for c in chunks))
                real = len(chunk) + sum(len(c) for c in chunks)
                deepest = max(row.cached, *(self.rows[s].cached for s in slots))
                if width * (len(slots) + 1) <= 1.25 * real and deepest + width <= self.pool.capacity:
                    slots.append(slot)
                    chunks.append(chunk)
                    continue
            groups.append(([slot], [chunk]))
        return groups

    def _multi_token_pass(self, slots: list[int], chunks: list[list[int]]) -> None:
        rows = [self.rows[s] for s in slots]
        width = max(len(c) for c in chunks)
        ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks], device=self.device)
        new_tokens = torch.tensor([len(c) for c in chunks], device=self.device) if len(rows) > 1 else None
        logits = self._forward(slots[0], rows, ids, new_tokens)
        for i, (slot, row, chunk) in enumerate(zip(slots, rows, chunks)):
            self._consumed(row, len(chunk))
            computed_prompt = row.cached - len(chunk) < len(row.prompt_ids)
            if self.prefix_cache is not None and computed_prompt:
                self.prefix_cache.insert(row.prompt_ids, row.block_hashes, row.cached, self.pool, slot)
            if not row.pending:
                self._next_token(row, logits[i, -1])

    def _pass_length(self, row: Request) -> int:
        """Tokens for a row's next multi-token pass. With a prefix cache, prompt passes end on
        block boundaries (one block per pass when Mamba state must be checkpointed there)."""
        length = min(self.prefill_chunk, len(row.pending))
        cache = self.prefix_cache
        if cache is None or row.cached >= len(row.prompt_ids):
            return length
        size = cache.block_size
        if cache.has_fixed_state:
            return min(length, size - row.cached % size)
        end = (row.cached + length) // size * size
        return end - row.cached if row.cached + length < len(row.prompt_ids) and end > row.cached else length

    def _decode_run(self, slots: list[int]) -> None:
        rows = [self.rows[s] for s in slots]
        ids = torch.tensor([[r.pending[0]] for r in rows], device=self.device)
        logits = self._forward(slots[0], rows, ids)[:, -1]
        constraints = [r.constraint for r in rows]
        if any(c is not None for c in constraints):  # all masks of the batch in one call
            try:
                apply_masks(logits, constraints)
            except PlaitError as exc:
                for row in rows:
                    if row.constraint is not None:
                        self._finish(row, "error", exc, release=False)
        for i, row in enumerate(rows):
            self._consumed(row, 1)
            self._next_token(row, logits[i], masked=True)

    def _forward(
        self, first_slot: int, rows: list[Request], ids: torch.Tensor, new_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        lens = torch.tensor([r.cached for r in rows], dtype=torch.long, device=self.device)
        for r in rows:
            r.usage.forward_passes += 1
        if self.decode_graphs is not None and ids.shape[1] == 1:
            logits = self.decode_graphs.run(ids, first_slot, lens, live_slots=len(self.rows))
            if logits is not None:
                return logits
        return self.model(ids, Batch(self.pool, first_slot, lens, new_tokens), last_only=True)

    def _consumed(self, row: Request, count: int) -> None:
        self.prompt_tokens_computed += max(0, min(count, len(row.prompt_ids) - row.cached))
        row.cached += count
        del row.pending[:count]

    def _next_token(self, row: Request, logits: torch.Tensor, masked: bool = False) -> None:
        """Sample a row's next token from its last logits (already grammar-masked if `masked`)."""
        if row.finish_reason is not None:
            return
        constraint = row.constraint
        try:
            if constraint is not None and not masked:
                mask = constraint.mask().to(logits.device)
                logits = logits[: mask.shape[0]].masked_fill(~mask, float("-inf"))
            token = sample(logits, row.params, row._generator)
            row.usage.sampled_tokens += 1
            forced: list[int] = []
            if constraint is not None:
                constraint.advance([token])
                if not constraint.is_finished():
                    forced = constraint.forced()
                    if forced:
                        constraint.advance(forced)
        except PlaitError as exc:
            self._finish(row, "error", exc, release=False)
            return
        row.usage.forced_tokens += len(forced)
        new = [token, *forced]
        stop_ids = self.tokenizer.stop_token_ids
        if constraint is None and token in stop_ids:
            self._finish(row, "stop", release=False)
            return
        row.token_ids.extend(t for t in new if t not in stop_ids)
        row.usage.completion_tokens = len(row.token_ids)
        if self._check_text(row):
            return
        if constraint is not None and constraint.is_finished():
            self._finish(row, "stop", release=False)
        elif len(row.token_ids) >= row.params.max_tokens or row.cached + len(new) >= self.pool.max_length:
            self._finish(row, "length", release=False)
        else:
            row.pending = new

    def _check_text(self, row: Request) -> bool:
        """Decode, apply stop strings, stream what can no longer be part of a stop string."""
        text = self.tokenizer.decode(row.token_ids)
        for stop in row.params.stop:
            at = text.find(stop)
            if at != -1:
                row.text = text[:at]
                self._finish(row, "stop", release=False)
                return True
        row.text = text
        if row.stream:
            hold = max((len(s) - 1 for s in row.params.stop), default=0)
            safe = len(text) - hold
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                safe = min(safe, len(text) - 1)
            if safe > row.emitted:
                row._deltas.put(text[row.emitted : safe])
                row.emitted = safe
        return False

    def _finish(
        self, row: Request, reason: str, error: BaseException | None = None, release: bool = True
    ) -> None:
        if row.finish_reason is None:
            row.finish_reason, row.error = reason, error
            if row.stream:
                if error is None and len(row.text) > row.emitted:
                    row._deltas.put(row.text[row.emitted :])
                    row.emitted = len(row.text)
                row._deltas.put(None)
            row._done.set()
        if release:
            self._release(row)

    def _release(self, row: Request) -> None:
        """Free the row's slot; the last row moves into the hole so slots stay compact."""
        if row not in self.rows:
            return
        slot = self.rows.index(row)
        last = len(self.rows) - 1
        if slot != last:
            moved = self.rows[last]
            self.pool.move(last, slot, moved.cached)
            self.rows[slot] = moved
        self.rows.pop()

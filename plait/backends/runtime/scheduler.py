"""One thread owns the model; callers submit requests and wait on them. The scheduler plans the
passes of each step and runs them.

Every running sequence sits in a slot of the `StatePool` (slots 0..N-1, kept compact) and has
`pending` tokens not yet in its cache (see `Sequence`). Each step:

* rows with one pending token are decoded together, one forward pass per contiguous run of
  slots (normally a single pass for the whole batch: continuous batching);
* rows with several pending tokens (a prompt, or a forced span) get multi-token passes, chunked:
  a step runs at most `step_tokens` tokens, decode rows first and prompt chunks sharing the
  rest, so a burst of long prompts cannot stall the rows that are decoding;
* a row whose pending tokens are all in the cache samples its next token from the last logits
  (all rows of a pass at once: `sample_rows`).

Prefill-only requests (`Engine.prefill`) compute their prompt's blocks into the prefix cache and
end; a background one is admitted only while no generation request runs or waits, and is put
back in the queue when one comes.

New requests join at the next step; finished ones leave their slot, and the last row moves into
the hole. Memory: the pool is sized to the step's need (slots x longest row) under the memory
budget; when a step would not fit, the newest rows are preempted — their state is dropped and
they are recomputed when admitted again, with their grammar, sampler and text intact. A full
queue raises `EngineOverloadedError` (back-pressure); a request that can never fit the budget
fails with `MemoryBudgetError`. A failure is kept to the rows it belongs to: a pass that raises
fails its own rows, a row whose sampling or grammar fails fails alone, and the rest run on.
"""

import atexit
import contextlib
import itertools
import logging
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plait.backends.grammar.constraint import apply_masks
from plait.backends.loading.tokenizer import Tokenizer
from plait.backends.models.base import CausalLM
from plait.backends.models.passes import prompt_pass
from plait.backends.models.state import Batch, has_fixed_state
from plait.backends.runtime.cuda_graphs import DecodeGraphs
from plait.backends.runtime.detokenizer import IncrementalDetokenizer
from plait.backends.runtime.drafting import (
    Drafter,
    DraftLength,
    PromptLookup,
    best_length,
    draft_plan,
    expected_kept,
    padding_pays,
)
from plait.backends.runtime.host_memory import release_free_memory
from plait.backends.runtime.mtp_drafting import MTPDrafter
from plait.backends.runtime.pass_costs import PassCosts
from plait.backends.runtime.prefix_cache import PrefixCache, block_hashes
from plait.backends.runtime.request import Request
from plait.backends.runtime.sampling import sample_rows, verify_draft
from plait.backends.runtime.sequence import Sequence
from plait.backends.runtime.state_pool import StatePool
from plait.errors import EngineClosedError, EngineOverloadedError, MemoryBudgetError

log = logging.getLogger(__name__)

TRIM_EVERY = 8
"""Every this many steps, free heap pages go back to the OS (see host_memory)."""

MIN_PREFILL_SHARE = 4
"""Prompt chunks get at least 1/4 of a step's tokens, however many rows are decoding."""

BACKGROUND_CHUNK = 64
"""Tokens of a background prefill's pass, at most (rounded down to whole blocks): a request
that arrives while one runs waits for that pass only."""


@dataclass
class StepPlan:
    """The passes of one step, over the current slots."""

    groups: list[tuple[list[int], list[list[int]]]]  # multi-token passes: slots, chunk of each
    decode_runs: list[list[int]]  # one-token passes: contiguous slots
    fresh: list[int]  # a prompt's last token, alone pending (its own pass each)
    length: int  # the longest row after this step: what the pool must hold


def _in_prompt(row: Sequence) -> bool:
    """Whether the row's next pending token is still one of its prompt's, or of the tokens its
    grammar forced before anything was sampled (`Sequence.forced_prefix`)."""
    return row.cached < len(row.prompt_ids) + row.forced_prefix


def _background(row: Sequence) -> bool:
    """Whether the row is a background prefill (computed only in otherwise idle steps)."""
    return row.request.prefill is not None and row.request.prefill.background


class _ForwardFailed(Exception):
    """The model raised inside a pass (the original error is the `__cause__`): no row of the
    pass has consumed its tokens yet, so each can be rerun."""


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
        *,
        max_batch_size: int,
        max_queue: int,
        prefill_chunk: int,
        step_tokens: int,
        prefix_cache: PrefixCache | None = None,
        speculative: str | None = None,
        draft_tokens: int = 4,
        before_step: Callable[[], object] | None = None,
    ):
        """`before_step` runs on the scheduler thread before each step admits anything (the
        engine sets its CPU thread count there: the step's copies and fills are parallel ops
        too, as slow as its passes with a thread too many)."""
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.before_step = before_step
        self.prefix_cache = prefix_cache
        self.speculative, self.draft_tokens = speculative, draft_tokens
        #: a new request's drafter (speculative decoding); tests put an oracle here
        self.make_drafter: Callable[[Request], Drafter] = lambda request: PromptLookup(request.prompt_ids)
        self.mtp = MTPDrafter(model, pool) if speculative == "mtp" else None
        self.drafted_tokens = self.accepted_tokens = self.replayed_tokens = 0
        self.cut_drafts = 0  # drafts that ended in a rejected token
        self.pass_costs = PassCosts()  # what passes cost here: whether a step's drafts pay
        #: False: draft whenever a drafter has a guess, whatever it costs (for comparisons)
        self.weigh_drafts = True
        self.prompt_tokens_computed = 0
        self.prefill_tokens_computed = 0  # by prefill-only requests (Engine.prefill)
        self.preemptions = 0
        self.forked_rows = 0  # samples started from another row's prefill (see submit_group)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self.device = next(model.parameters()).device
        self._fixed_state = has_fixed_state(pool.layer_specs)
        # None off CUDA, and with the MTP head, which needs every pass's hidden states
        self.decode_graphs = DecodeGraphs.for_device(model, pool) if speculative != "mtp" else None
        self.padded_passes = True  # see _multi_token_groups; False: one row per pass (for comparison)
        self.rows: list[Sequence] = []  # rows[i] lives in slot i
        self.waiting: deque[Sequence] = deque()
        self._admissions = itertools.count()
        self.cond = threading.Condition()
        self.closed = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="plait-scheduler", daemon=True)
        self.thread.start()
        _live.add(self)

    # ---- callers' side -----------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        self._enqueue(self._sequence(request))
        return request

    def submit_group(self, requests: list[Request]) -> list[Request]:
        """Samples of one prompt from one prefill: the first request's row computes the prompt,
        the others wait in slots of their own and, when it ends, start from copies of its state
        (KV cache and any Mamba state) and sample their first tokens from its logits, each
        with its own generator (see `_forked`). Every request needs the same prompt and, if
        any, the same grammar (what it forces before the first sample is part of the prompt).

        The pool keeps one contiguous KV cache per slot, so the prompt's KV is copied into
        each sample's slot (a copy costs far less than a prefill on CPU); sharing the blocks
        themselves, copy-on-write, needs a paged pool."""
        leader, *forks = [self._sequence(request) for request in requests]
        for fork in forks:
            if fork.pending != leader.pending:
                raise ValueError("the samples of a group must share their prompt and grammar")
            fork.pending = []
        leader.forks = forks
        self._enqueue(leader)
        return requests

    def _sequence(self, request: Request) -> Sequence:
        """A request as the scheduler runs it: its generator, detokenizer, drafter, and the
        tokens its grammar forces before the first sample joined to the prompt's prefill."""
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        elif not params.greedy:
            generator = torch.Generator().manual_seed(random.getrandbits(63))
        sequence = Sequence(
            request,
            IncrementalDetokenizer(self.tokenizer.decode, params.stop),
            generator,
            pending=list(request.prompt_ids),
        )
        if request.constraint is not None:
            forced = request.constraint.forced()
            if forced:
                request.constraint.advance(forced)
                sequence.pending += forced
                sequence.forced_prefix = len(forced)
                request.usage.forced_tokens = len(forced)
                sequence.append_output(forced)
        if self.speculative is not None:
            sequence.drafter = self.make_drafter(request) if self.speculative == "ngram" else None
            sequence.draft_length = DraftLength(self.draft_tokens)
        if self.prefix_cache is not None:
            sequence.block_hashes = block_hashes(request.prompt_ids, self.prefix_cache.block_size)
        return sequence

    def _enqueue(self, sequence: Sequence) -> None:
        with self.cond:
            if self.closed:
                raise EngineClosedError("the engine is closed")
            if len(self.waiting) >= self.max_queue:
                raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting: retry later")
            self.waiting.append(sequence)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ---- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()  # the pool's tensors are made and written here only: inference tensors
    def _loop(self) -> None:
        while True:
            with self.cond:
                if not self.rows and not self.waiting:
                    self.pool.fit(0, 1, shrink=True)  # idle: give the decoding state's memory back
                while not self.closed and not self.rows and not self.waiting:
                    self.cond.wait()
                if self.closed:
                    break
                if self.before_step is not None:
                    self.before_step()
                self._admit()
            try:
                self._step()
            except Exception as exc:  # a bug outside any one pass: fail the running rows, keep serving
                log.exception("engine step failed")
                for row in list(self.rows):
                    self._finish(row, "error", exc)
        for row in list(self.rows) + list(self.waiting):
            for sequence in [*row.forks, row]:  # its samples first: none is left to hand over to
                self._finish(sequence, "error", EngineClosedError("the engine was closed"), release=False)

    def _admit(self) -> None:
        generating = any(not _background(r) for r in [*self.rows, *self.waiting])
        if generating:
            self._set_background_aside()
        deferred: list[Sequence] = []
        while self.waiting and len(self.rows) < self.max_batch_size:
            row = self.waiting.popleft()
            if generating and _background(row) and not row.request.cancelled:
                deferred.append(row)
                continue
            try:
                admitted = self._admit_one(row)
            except Exception as exc:  # this request cannot start (a bug, or a failed restore)
                log.exception("admitting a request failed")
                if row in self.rows:
                    self._release(row)
                self._finish(row, "error", exc, release=False)
                continue
            if admitted is None:  # no room yet: others will finish and free it (back-pressure)
                self.waiting.appendleft(row)
                break
            if not admitted:
                deferred.append(row)  # a running prefill is computing its prefix: reuse it
        self.waiting.extendleft(reversed(deferred))

    def _set_background_aside(self) -> None:
        """Background prefills hold no slot while a generation request runs or waits: each goes
        back to the queue (what it computed is in the prefix cache, restored when it is
        admitted again), so it takes neither a pass, nor batch room, nor decoding memory."""
        for row in [r for r in self.rows if _background(r)]:
            self._release(row)
            row.restart()
            self.waiting.append(row)

    def _admit_one(self, row: Sequence) -> bool | None:
        """Give `row` a slot: True when admitted (or finished at once), False to try again after
        this step (its prefix is being computed), None when memory has no room for it now."""
        if row.request.cancelled or row.detokenizer.stopped:
            self._finish(row, "cancelled" if row.request.cancelled else "stop", release=False)
            return True
        restorable = 0
        if row.request.prefill is not None and row.cached == 0:
            cached = self.prefix_cache.cached_blocks(row.block_hashes) * self.prefix_cache.block_size
            if cached >= len(row.prompt_ids):  # nothing left to compute
                row.request.usage.cached_tokens = len(row.prompt_ids)
                if row.request.prefill.pin:  # blocks another request computed
                    self.prefix_cache.pin(row.block_hashes)
                self._finish(row, "stop", release=False)
                return True
        if self.prefix_cache is not None and row.cached == 0:
            restorable = self.prefix_cache.match(row.prompt_ids, row.block_hashes)
            if self._prefix_in_flight(row) > restorable:
                return False
        need = min(max([r.cached + 1 for r in self.rows] + [len(row.prompt_ids) + 1]), self.pool.max_length)
        if not self.pool.fits(len(self.rows) + 1, need):
            if self.rows:
                return None
            self._finish(row, "error", self._never_fits(len(row.prompt_ids) + 1), release=False)
            return True
        slot = len(self.rows)
        self.pool.fit(slot + 1, need)
        self.pool.clear(slot)
        if restorable:
            self.prefix_cache.restore(row.block_hashes, restorable, self.pool, slot)
            row.cached, row.request.usage.cached_tokens = restorable, restorable
            row.mtp_cached = restorable  # cached blocks hold the MTP head's pairs too
            del row.pending[:restorable]
        if row.order < 0:
            row.order = next(self._admissions)
        self.rows.append(row)
        self._admit_forks(row, need)
        return True

    def _admit_forks(self, leader: Sequence, need: int) -> None:
        """Slots for the samples waiting on `leader`'s prefill, as far as the batch and the
        memory have room; the others go back to the queue to be computed on their own (a
        sample still draws from its own generator). Admitted after their leader, they are
        newer and preempted before it: a leader never waits in the queue for its samples."""
        unfit = []
        for fork in leader.forks:
            if fork.request.cancelled:
                self._finish(fork, "cancelled", release=False)
            elif len(self.rows) < self.max_batch_size and self.pool.fits(len(self.rows) + 1, need):
                self.pool.fit(len(self.rows) + 1, need)
                fork.order = next(self._admissions)
                self.rows.append(fork)
            else:
                fork.restart()
                unfit.append(fork)
        leader.forks = [f for f in leader.forks if f in self.rows]
        self.waiting.extendleft(reversed(unfit))

    def _never_fits(self, length: int) -> MemoryBudgetError:
        needed = self.pool.bytes_for(1, length)
        return MemoryBudgetError(
            f"a sequence of {length} tokens needs {needed / 2**20:.0f} MiB of decoding state, over the "
            f"engine's budget of {self.pool.budget_bytes / 2**20:.0f} MiB: shorten the prompt or raise "
            "memory_budget_mb"
        )

    def _prefix_in_flight(self, row: Sequence) -> int:
        """Tokens of `row`'s prompt that a row still in its prefill shares, block-aligned."""
        best = 0
        for other in self.rows:
            if other.cached >= len(other.prompt_ids):
                continue
            shared = 0
            for mine, theirs in zip(row.block_hashes, other.block_hashes):
                if mine != theirs:
                    break
                shared += 1
            best = max(best, shared * self.prefix_cache.block_size)
        return min(best, len(row.prompt_ids) - 1)

    # ---- one step --------------------------------------------------------------------------------
    def _step(self) -> None:
        self.steps += 1
        for row in [r for r in self.rows if r.request.cancelled]:
            self._finish(row, "cancelled")
        self._draft()
        plan = self._fit_memory()
        for slots, chunks in plan.groups:
            self._guarded(slots, chunks)
        for run in plan.decode_runs:
            self._guarded(run)
        for slot in plan.fresh:
            self._guarded([slot])
        for row in [r for r in self.rows if r.finished]:
            self._release(row)
        if self.steps % TRIM_EVERY == 0:
            release_free_memory()

    def _guarded(self, slots: list[int], chunks: list[list[int]] | None = None) -> None:
        """Run one pass; if it raises, its rows fail and the other passes still run. When the
        model itself failed on a pass of several rows and its state is attention only (written
        past each row's cached length, so untouched as far as the rows know), each row is
        rerun alone: only the row that fails alone fails. (Mamba state is updated in place
        layer by layer: a failed hybrid pass fails all its rows.)"""
        try:
            self._run_pass(slots, chunks)
        except _ForwardFailed as failed:
            if len(slots) > 1 and not self._fixed_state:
                for i, slot in enumerate(slots):
                    self._guarded([slot], None if chunks is None else [chunks[i]])
                return
            self._fail(slots, failed.__cause__)
        except Exception as exc:
            self._fail(slots, exc)

    def _fail(self, slots: list[int], error: BaseException) -> None:
        log.error("a forward pass of %d row(s) failed", len(slots), exc_info=error)
        for slot in slots:
            self._finish(self.rows[slot], "error", error, release=False)

    def _run_pass(self, slots: list[int], chunks: list[list[int]] | None) -> None:
        if chunks is not None:
            self._multi_token_pass(slots, chunks)
        elif _in_prompt(self.rows[slots[0]]):
            self._fresh_pass(slots[0])
        else:
            self._decode_run(slots)

    @staticmethod
    def _speculative(row: Sequence) -> bool:
        """Whether the row's pass this step verifies a draft (or replays taken-back tokens, or
        rides along with the rows that do)."""
        return bool(row.draft) or row.replay or row.rides_along

    def _draft(self) -> None:
        """Each decoding row's draft for this step (speculative decoding; see drafting.py),
        cut where its grammar would refuse it and to what the row still has room for."""
        if self.speculative is None:
            return
        for slot, row in enumerate(self.rows):
            row.draft, row.rides_along = [], False
            if row.finished or row.draft_length is None or _in_prompt(row) or row.forks:
                continue  # a row with samples waiting forks where its prompt ends: in `_sample`
            if self.mtp is not None and (len(row.pending) > 1 or row.replay):
                continue  # the head drafts from the hidden state of the token before the last
            room = min(
                row.draft_length.wanted(),
                row.params.max_tokens - len(row.request.token_ids) - 1,
                self.pool.max_length - row.cached - len(row.pending) - 1,
                self.prefill_chunk - len(row.pending),
            )
            if room <= 0:
                continue
            if self.mtp is not None:
                draft = self.mtp.propose(slot, row, room)
            else:
                draft = row.drafter.propose(row.request.token_ids, room)
            if draft and row.constraint is not None:
                draft = draft[: row.constraint.valid_prefix(draft)]
            row.draft = draft
        self._weigh_drafts()

    def _weigh_drafts(self) -> None:
        """Keep this step's drafts only as far as they should pay for their pass (see
        pass_costs.py): each is cut to its most rewarding length for its row's rate of kept
        tokens, and all are dropped when the step would still be slower with them."""
        line = self.pass_costs.line() if self.weigh_drafts else None
        if line is None:
            return
        decoding = [r for r in self.rows if len(r.pending) == 1 and r.cached > 0 and not r.finished]
        drafting = [r for r in decoding if r.draft]
        prior = (self.accepted_tokens + 1) / (self.accepted_tokens + self.cut_drafts + 2)
        rates = [r.draft_length.rate(prior) for r in drafting]
        for row, rate in zip(drafting, rates):
            row.draft = row.draft[: best_length(line, len(decoding), len(row.draft), rate)]
        left = [(len(r.draft), rate) for r, rate in zip(drafting, rates) if r.draft]
        expected = [expected_kept(rate, n) for n, rate in left]
        plan = draft_plan(line, len(decoding), [n for n, _ in left], expected)
        for row in decoding:
            if plan == "plain":
                row.draft = []
            row.rides_along = plan == "merged" and not row.draft

    def _plan(self) -> StepPlan:
        decode_runs: list[list[int]] = []
        run: list[int] = []
        decoding = 0
        for slot, row in enumerate([*self.rows, None]):
            decodes = row is not None and len(row.pending) == 1 and not _in_prompt(row)
            if decodes and not self._speculative(row):
                run.append(slot)
                decoding += 1
                continue
            if run:
                decode_runs.append(run)
                run = []
        fresh = [s for s, r in enumerate(self.rows) if len(r.pending) == 1 and _in_prompt(r)]
        decoding += sum(len(r.pending) + len(r.draft) for r in self.rows if self._speculative(r))
        budget = max(self.step_tokens - decoding - len(fresh), self.step_tokens // MIN_PREFILL_SHARE)
        groups = self._multi_token_groups(budget)
        length = max([r.cached + min(len(r.pending), 1) for r in self.rows], default=1)
        for slots, chunks in groups:
            width = max(len(c) for c in chunks)
            length = max(length, max(self.rows[s].cached for s in slots) + width)
        return StepPlan(groups, decode_runs, fresh, length)

    def _fit_memory(self) -> StepPlan:
        """The step's plan, once the pool holds it: the newest rows are preempted while it would
        not fit the budget; a lone row that cannot fit fails."""
        plan = self._plan()
        while not self.pool.fits(len(self.rows), plan.length):
            if any(r.draft for r in self.rows):  # drafts are optional: drop them before any row
                for row in self.rows:
                    row.draft, row.rides_along = [], False
                plan = self._plan()
                continue
            if len(self.rows) == 1:
                self._finish(self.rows[0], "error", self._never_fits(plan.length))
                return self._plan()
            self._preempt(max(self.rows, key=lambda r: r.order))
            plan = self._plan()
        self.pool.fit(len(self.rows), plan.length)
        return plan

    def _preempt(self, row: Sequence) -> None:
        """Give up a row's state to make room; it waits first in line and is recomputed (a
        sample waiting on its leader's prefill leaves the group and computes its own)."""
        for leader in self.rows:
            if row in leader.forks:
                leader.forks.remove(row)
        self._release(row)
        row.restart()
        self.waiting.appendleft(row)
        self.preemptions += 1

    def _multi_token_groups(self, budget: int) -> list[tuple[list[int], list[list[int]]]]:
        """The rows with more than one pending token, with this step's chunk of each (in slot
        order, while the step's `budget` of tokens lasts), grouped into passes. Prompts that
        arrive together are prefilled in one pass, each row padded on the right to the longest
        (a matmul over many rows uses the cores better than many small ones). Padding never
        reaches a row's state: attention writes its keys past the row's end where nothing
        reads them, and Mamba layers give it dt = 0 and end the conv history at the row's last
        real token (`Batch.new_tokens`), so hybrids batch prompts too. A group is contiguous
        slots and stops before padding would exceed a quarter of the pass."""
        groups: list[tuple[list[int], list[list[int]]]] = []
        for slot, row in enumerate(self.rows):
            speculative = self._speculative(row)
            if speculative:  # verified whole, like a decode row: outside the prompts' budget
                chunk = row.pending + row.draft
            elif len(row.pending) <= 1 or budget <= 0:
                continue
            else:
                length = min(self._pass_length(row), budget)
                if row.request.prefill is not None:  # whole blocks: its last one is cached too
                    length -= length % self.prefix_cache.block_size
                    if not length:
                        continue
                chunk = row.pending[:length]
                budget -= len(chunk)
            last = groups[-1][0][-1] if groups else None
            joins = last is not None and self._pass_kind(self.rows[last]) == self._pass_kind(row)
            if joins and self.padded_passes and last == slot - 1:
                slots, chunks = groups[-1]
                width = max(len(chunk), *(len(c) for c in chunks))
                real = len(chunk) + sum(len(c) for c in chunks)
                padding = width * (len(slots) + 1) - real
                line = self.pass_costs.line() if speculative and self.weigh_drafts else None
                if width * (len(slots) + 1) <= 1.25 * real or padding_pays(line, padding):
                    slots.append(slot)
                    chunks.append(chunk)
                    continue
            groups.append(([slot], [chunk]))
        return groups

    def _pass_kind(self, row: Sequence) -> tuple[bool, bool]:
        """Rows share a multi-token pass only when this is the same: verifying a draft or not,
        and prompt tokens or generated ones (quantised models run these on other weights)."""
        return self._speculative(row), _in_prompt(row)

    def _pass_length(self, row: Sequence) -> int:
        """Tokens for a row's next multi-token pass. With a prefix cache, prompt passes end on
        block boundaries (one block per pass when Mamba state must be checkpointed there)."""
        length = min(self.prefill_chunk, len(row.pending))
        cache = self.prefix_cache
        if _background(row):
            length = min(length, max(BACKGROUND_CHUNK // cache.block_size, 1) * cache.block_size)
        if cache is None or row.cached >= len(row.prompt_ids):
            return length
        size = cache.block_size
        if cache.has_fixed_state:
            return min(length, size - row.cached % size)
        end = (row.cached + length) // size * size
        return end - row.cached if row.cached + length < len(row.prompt_ids) and end > row.cached else length

    # ---- passes ------------------------------------------------------------------------------
    def _multi_token_pass(self, slots: list[int], chunks: list[list[int]]) -> None:
        rows = [self.rows[s] for s in slots]
        width = max(len(c) for c in chunks)
        ids = torch.tensor([c + [c[-1]] * (width - len(c)) for c in chunks], device=self.device)
        new_tokens = torch.tensor([len(c) for c in chunks], device=self.device) if len(rows) > 1 else None
        if self._speculative(rows[0]):
            self._speculative_pass(slots, rows, chunks, ids, new_tokens)
            return
        logits, hidden = self._forward(slots[0], rows, ids, new_tokens, prompt=_in_prompt(rows[0]))
        logits = logits[:, -1]
        done = []
        for i, (slot, row, chunk) in enumerate(zip(slots, rows, chunks)):
            self._consumed(row, len(chunk))
            computed_prompt = row.cached - len(chunk) < len(row.prompt_ids)
            if hidden is not None:  # before the prefix cache copies the block: pair it in the head
                self._observe(slot, row, hidden[i, : len(chunk)], catch_up=computed_prompt)
            if self.prefix_cache is not None and computed_prompt:
                pin = row.request.prefill is not None and row.request.prefill.pin
                self.prefix_cache.insert(row.prompt_ids, row.block_hashes, row.cached, self.pool, slot, pin)
            if not row.pending and row.request.prefill is not None:
                self._finish(row, "stop", release=False)  # its blocks are cached (pinned if asked)
            elif not row.pending:
                done.append(i)
        if done:
            self._sample([rows[i] for i in done], logits[done])

    def _speculative_pass(
        self,
        slots: list[int],
        rows: list[Sequence],
        chunks: list[list[int]],
        ids: torch.Tensor,
        new_tokens: torch.Tensor | None,
    ) -> None:
        """Feed each row's pending tokens and draft in one pass and keep what verifies. The
        logits of a row's last len(draft) + 1 positions judge its draft (see `_verify`). The
        pass treats its tokens as the one-token steps they stand for (`Batch.step_clamp`)."""
        count = max(len(r.draft) for r in rows) + 1
        saved = self.pool.save_fixed(slots[0], len(rows)) if self._fixed_state else None
        logits, hidden = self._forward(slots[0], rows, ids, new_tokens, logit_count=count, step_clamp=True)
        for i, (slot, row, fed) in enumerate(zip(slots, rows, chunks)):
            try:
                kept = self._verify(row, fed, logits[i, count - len(row.draft) - 1 :])
            except Exception as exc:  # a grammar or tokenizer failure: this row only
                log.exception("a row failed while verifying its draft")
                self._finish(row, "error", exc, release=False)
                continue
            if row.finished or kept == len(fed) or saved is None:
                row.cached += kept
                row.replay = False
                if hidden is not None and not row.finished:
                    self._observe(slot, row, hidden[i, :kept])
            else:  # Mamba state took in rejected tokens: go back, feed the kept ones again
                self.pool.restore_fixed(saved, i, slot)
                row.pending = fed[:kept] + row.pending
                row.replay = True
                self.replayed_tokens += kept

    def _verify(self, row: Sequence, fed: list[int], logits: torch.Tensor) -> int:
        """Choose the row's next tokens from the logits [D + 1, V] of its pass's last positions
        exactly as plain decoding would (grammar masks, greedy or sampled, forced tokens), for
        as long as they agree with the draft of D tokens fed after `pending`; the row's next
        pending tokens are set, and the count of fed tokens whose state is valid is returned.

        Draft token j is kept only if the token chosen at its position is that token (and the
        tokens the grammar forces after it are the draft's next ones too), so the kept run is
        what one-token decoding would have produced; the first choice that disagrees replaces
        the rest of the draft, and a fully kept draft earns one more token from its last
        position. The grammar only ever consumes kept tokens: nothing to roll back."""
        draft, row.draft, row.rides_along = row.draft, [], False
        before = len(fed) - len(draft)  # the pending tokens fed ahead of the draft
        argmax = None
        if row.constraint is None and row.params.greedy and not torch.isnan(logits).any():
            argmax = logits.argmax(-1).tolist()  # one host sync for the whole draft
        at = 0
        while True:
            proposed = draft[at] if at < len(draft) else None
            if argmax is not None:
                token = argmax[at]
            else:
                failed = apply_masks(logits[at : at + 1], [row.constraint])
                if failed:
                    raise failed[0]
                token = verify_draft(logits[at], row.params, row.generator, proposed)
            if token is None:
                raise RuntimeError("no token can follow: the logits are NaN or the grammar allows none")
            new = self._next_token(row, token, row.cached + before + at)
            if new is None:
                break
            if draft[at : at + len(new)] != new:
                row.pending = new
                break
            at += len(new)
        self.drafted_tokens += len(draft)
        self.accepted_tokens += at
        row.request.usage.drafted_tokens += len(draft)
        row.request.usage.accepted_tokens += at
        if draft:
            row.draft_length.record(len(draft), at)
            self.cut_drafts += at < len(draft)
        return before + at

    def _decode_run(self, slots: list[int]) -> None:
        rows = [self.rows[s] for s in slots]
        ids = torch.tensor([[r.pending[0]] for r in rows], device=self.device)
        logits, hidden = self._forward(slots[0], rows, ids)
        for i, (slot, row) in enumerate(zip(slots, rows)):
            self._consumed(row, 1)
            if hidden is not None:
                self._observe(slot, row, hidden[i])
        self._sample(rows, logits[:, -1])

    def _fresh_pass(self, slot: int) -> None:
        row = self.rows[slot]
        ids = torch.tensor([row.pending], device=self.device)
        logits, hidden = self._forward(slot, [row], ids, prompt=True)
        self._consumed(row, 1)
        if hidden is not None:
            self._observe(slot, row, hidden[0])
        self._sample([row], logits[:, -1])

    def _observe(self, slot: int, row: Sequence, hidden: torch.Tensor, catch_up: bool = False) -> None:
        """Hand the MTP head the hidden states [n, H] of the row's n newest cached positions;
        with `catch_up`, pair them in the head's state now (see runtime/mtp_drafting.py)."""
        self.mtp.observe(row, hidden)
        if catch_up:
            self.mtp.catch_up(slot, row)

    def _forward(
        self,
        first_slot: int,
        rows: list[Sequence],
        ids: torch.Tensor,
        new_tokens: torch.Tensor | None = None,
        logit_count: int = 1,
        step_clamp: bool = False,
        prompt: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [rows, logit_count, V] of each row's last `logit_count` real positions, and
        with the MTP head the hidden states [rows, T, H] of every position (else None). A
        `prompt` pass runs under `passes.prompt_pass`. Each pass's time goes into `pass_costs`
        (on CUDA that is launch time: passes look cheap, as a GPU's small passes nearly are)."""
        lens = torch.tensor([r.cached for r in rows], dtype=torch.long, device=self.device)
        for r in rows:
            r.request.usage.forward_passes += 1
        started = time.perf_counter()
        try:
            if self.decode_graphs is not None and ids.shape[1] == 1:
                logits = self.decode_graphs.run(ids, first_slot, lens, live_slots=len(self.rows))
                if logits is not None:
                    return logits, None
            batch = Batch(self.pool, first_slot, lens, new_tokens, logit_count, step_clamp)
            with prompt_pass() if prompt else contextlib.nullcontext():
                if self.mtp is not None:
                    return self.model(ids, batch, last_only=True, return_hidden=True)
                return self.model(ids, batch, last_only=True), None
        except Exception as exc:
            raise _ForwardFailed from exc
        finally:
            self.pass_costs.record(ids.numel(), time.perf_counter() - started)

    def _consumed(self, row: Sequence, count: int) -> None:
        computed = max(0, min(count, len(row.prompt_ids) - row.cached))
        if row.request.prefill is not None:
            self.prefill_tokens_computed += computed
        else:
            self.prompt_tokens_computed += computed
        row.cached += count
        del row.pending[:count]

    # ---- sampling and output -----------------------------------------------------------------
    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """The next token of each row from its last logits [len(rows), V]: grammar masks for the
        whole batch in one call, then one sample per row with one host sync."""
        rows, logits = self._forked(rows, logits)
        failed = apply_masks(logits, [r.constraint for r in rows])
        tokens = sample_rows(logits, [r.params for r in rows], [r.generator for r in rows])
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if i in failed:
                self._finish(row, "error", failed[i], release=False)
            elif token is None:
                error = RuntimeError("no token can follow: the logits are NaN or the grammar allows none")
                self._finish(row, "error", error, release=False)
            else:
                try:
                    new = self._next_token(row, token, row.cached)
                except Exception as exc:  # a grammar or tokenizer failure: this row only
                    log.exception("a row failed after sampling")
                    self._finish(row, "error", exc, release=False)
                    continue
                if new is not None:
                    row.pending = new

    def _forked(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """`rows` and their logits [len(rows), V], with the samples waiting on any of them
        added: a row sampling its first token has its whole prompt in its slot, which is then
        copied into each waiting sample's slot (KV cache, Mamba state, the MTP head's pairs),
        and each sample draws its first token from the same logits with its own generator."""
        if not any(row.forks for row in rows):
            return rows, logits
        grown, source = [], []
        for i, row in enumerate(rows):
            grown.append(row)
            source.append(i)
            forks, row.forks = row.forks, []
            slot = self.rows.index(row)
            for fork in forks:
                if fork.finished:
                    continue
                self.pool.move(slot, self.rows.index(fork), row.cached)
                fork.cached, fork.mtp_cached, fork.hidden = row.cached, row.mtp_cached, row.hidden
                self.forked_rows += 1
                grown.append(fork)
                source.append(i)
        return grown, logits[source]

    def _next_token(self, row: Sequence, token: int, cached: int) -> list[int] | None:
        """Take a chosen token into the row's output (with what the grammar forces after it) and
        return the tokens to feed next, or None when the row has finished. `cached`: how many
        tokens the row has in its state before them."""
        if row.finished:
            return None
        constraint = row.constraint
        row.request.usage.sampled_tokens += 1
        forced: list[int] = []
        if constraint is not None:
            constraint.advance([token])
            if not constraint.is_finished():
                forced = constraint.forced()
                if forced:
                    constraint.advance(forced)
        row.request.usage.forced_tokens += len(forced)
        new = [token, *forced]
        stop_ids = self.tokenizer.stop_token_ids
        if constraint is None and token in stop_ids:
            self._finish(row, "stop", release=False)
            return None
        stopped = row.append_output([t for t in new if t not in stop_ids])
        if stopped or (constraint is not None and constraint.is_finished()):
            self._finish(row, "stop", release=False)
        elif len(row.request.token_ids) >= row.params.max_tokens:
            self._finish(row, "length", release=False)
        elif cached + len(new) >= self.pool.max_length:
            self._finish(row, "length", release=False)
        else:
            return new
        return None

    def _finish(
        self, row: Sequence, reason: str, error: BaseException | None = None, release: bool = True
    ) -> None:
        row.finish(reason, error)
        if row.forks:
            self._hand_over(row)
        if release:
            self._release(row)

    def _hand_over(self, leader: Sequence) -> None:
        """`leader` ended before its prompt was computed (cancelled, or failed): the first of
        its samples still running computes the prompt instead, and the others wait on it."""
        forks, leader.forks = [f for f in leader.forks if not f.finished], []
        if not forks:
            return
        heir, heir.forks = forks[0], forks[1:]
        heir.restart()
        if heir in self.rows:
            self.pool.clear(self.rows.index(heir))
        else:
            self.waiting.appendleft(heir)

    def _release(self, row: Sequence) -> None:
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

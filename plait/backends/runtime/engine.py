"""The engine's public face: load a checkpoint, then score or generate through the scheduler."""

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from plait.backends.grammar.constraint import TokenConstraint
from plait.backends.grammar.reasoning import ReasoningFormat, detect_reasoning_format
from plait.backends.grammar.tool_formats import ToolFormat, detect_tool_format
from plait.backends.loading import registry
from plait.backends.models.base import ModelInfo
from plait.backends.models.dtypes import parse_dtype
from plait.backends.models.state import Batch
from plait.backends.runtime.cancellation import CancelScope, current_scope
from plait.backends.runtime.cpu_threads import CpuThreads, use_free_cores
from plait.backends.runtime.host_memory import release_free_memory
from plait.backends.runtime.openmp_teams import run_in_fresh_thread
from plait.backends.runtime.options import EngineOptions, machine_memory_budget_mb
from plait.backends.runtime.prefix_cache import PrefixCache
from plait.backends.runtime.request import Prefill, Request, Usage
from plait.backends.runtime.sampling import SamplingParams
from plait.backends.runtime.scheduler import Scheduler
from plait.backends.runtime.state_pool import StatePool
from plait.errors import ContextLengthError, EngineClosedError

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


@dataclass
class EngineStats:
    """What an engine has done so far (read-only counters; `engine.stats()` takes a snapshot and
    `later.since(earlier)` gives the work in between).

    `requests` went to the model; `shared` were answered by an identical request (one in flight,
    or the previous candidate of the same greedy call) at no cost. Of the computed requests'
    `prompt_tokens`, `prompt_tokens_computed` ran through the model; the rest came from the
    prefix cache. Every model pass is counted: a decode pass advances `rows` sequences by one
    token each (`decode_batches[rows]` passes of that size), a multi-token pass runs prompt
    chunks or forced spans of one sequence or of several, each padded on the right to the
    longest: `multi_token_tokens` counts their real tokens, `multi_token_padding` the padding
    computed alongside (thrown away); `rows_in_flight` sums, over passes, how many sequences
    the scheduler held at that moment; `preemptions` counts sequences whose state was given up
    to stay in the memory budget (recomputed later); `forward_seconds` is the time spent inside
    those passes. With speculative decoding, `drafted_tokens` were guessed and fed for
    verification and `accepted_tokens` of them were kept (`acceptance` is the share);
    `replayed_tokens` were kept but fed again, because a hybrid's Mamba state had to go back
    to before the pass's rejected tokens. `forked` samples of `submit_n` groups started from
    another sample's prefill instead of their own (each is one prefill saved). `prefills` are
    prefill-only requests (`Engine.prefill`, not counted in `requests`), which computed
    `prefill_tokens_computed` tokens into the prefix cache.
    """

    requests: int = 0
    shared: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    decode_passes: int = 0
    decode_tokens: int = 0
    multi_token_passes: int = 0
    multi_token_tokens: int = 0
    multi_token_padding: int = 0
    rows_in_flight: int = 0
    preemptions: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    replayed_tokens: int = 0
    forked: int = 0
    prefills: int = 0
    prefill_tokens_computed: int = 0
    forward_seconds: float = 0.0
    decode_batches: Counter = field(default_factory=Counter)

    @property
    def passes(self) -> int:
        return self.decode_passes + self.multi_token_passes

    @property
    def mean_decode_batch(self) -> float:
        return self.decode_tokens / self.decode_passes if self.decode_passes else 0.0

    @property
    def max_decode_batch(self) -> int:
        return max((size for size, count in self.decode_batches.items() if count > 0), default=0)

    @property
    def mean_rows_in_flight(self) -> float:
        return self.rows_in_flight / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the model agreed with (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def prompt_cache_share(self) -> float:
        """Fraction of prompt tokens restored from the prefix cache instead of computed."""
        return 1 - self.prompt_tokens_computed / self.prompt_tokens if self.prompt_tokens else 0.0

    def since(self, earlier: "EngineStats") -> "EngineStats":
        delta = {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)}
        return EngineStats(**delta)


@dataclass(frozen=True)
class EngineMemory:
    """What an engine holds now, in bytes: decoding state (KV cache, Mamba state) for the
    running sequences, and cached prompt blocks, each beside its budget."""

    state_bytes: int
    state_budget_bytes: int | None
    prefix_cache_bytes: int
    prefix_cache_budget_bytes: int
    running: int
    waiting: int


class _CountedModel:
    """The model as the scheduler sees it: each pass is timed and counted in the engine's stats
    (nothing is registered on the model itself, which other engines may share). On CUDA, decode
    steps replayed from a captured graph do not pass through here and are not counted."""

    def __init__(self, model: torch.nn.Module, engine: "Engine"):
        self._model, self._engine = model, engine

    def __call__(self, ids: torch.Tensor, batch: Batch | None = None, **kwargs: Any) -> torch.Tensor:
        started = time.perf_counter()
        out = self._model(ids, batch, **kwargs)
        new_tokens = batch.new_tokens if batch is not None else None
        self._engine._count_pass(ids.shape, new_tokens, time.perf_counter() - started)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class Engine:
    """A loaded model plus the scheduler thread that owns it.

    Thread-safe: any number of threads may call `generate` at once; their decode steps are
    batched together.
    """

    def __init__(self, model, tokenizer, model_id: str, family: str, **options: Any):
        """`options`: the fields of `EngineOptions` (max_batch_size, memory_budget_mb, ...)."""
        self.options = EngineOptions.from_kwargs(options)
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        #: how the chat template thinks (None: it has no thinking block); see plait.backends.runtime.turn
        self.reasoning_format: ReasoningFormat | None = detect_reasoning_format(tokenizer.chat_template)
        #: how the chat template writes tool calls (plait's JSON note when it knows no tools)
        self.tool_format: ToolFormat = detect_tool_format(tokenizer.chat_template)
        self.info: ModelInfo = model.info(family)
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.max_length = min(self.options.max_length or model.context_length, model.context_length)
        budget_mb = self.options.memory_budget_mb or machine_memory_budget_mb(self.device)
        self.pool = StatePool(model.state_specs(dtype), self.device, self.max_length, budget_mb * 2**20)
        self._inflight: dict[Any, Request] = {}
        self._inflight_lock = threading.Lock()
        self.prefix_cache = None
        if self.options.prefix_cache:
            # attention-only models restore any block-aligned prefix: small blocks leave fewer of
            # a prompt's shared tokens to recompute (a DSPy prompt's own part starts mid-block);
            # Mamba state is checkpointed once per block pass, so hybrids keep bigger blocks
            block = self.options.prefix_block_size or (64 if model.state_chunk > 1 else 16)
            block = -(-block // model.state_chunk) * model.state_chunk  # a multiple of the SSD chunk
            self.prefix_cache = PrefixCache(
                self.pool.layer_specs, block, self.options.prefix_cache_mb * 2**20
            )
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        #: on CPU, the threads each step gets (see plait.backends.runtime.cpu_threads)
        self.cpu_threads = (
            CpuThreads(self.options.cpu_threads, adapt=self.options.cpu_threads is None)
            if self.device.type == "cpu"
            else None
        )
        self.scheduler = Scheduler(
            _CountedModel(model, self),
            tokenizer,
            self.pool,
            max_batch_size=self.options.max_batch_size,
            max_queue=self.options.max_queue,
            prefill_chunk=self.options.prefill_chunk,
            step_tokens=self.options.step_token_budget(self.device),
            prefix_cache=self.prefix_cache,
            speculative=self.options.speculative,
            draft_tokens=self.options.draft_tokens,
            before_step=None if self.cpu_threads is None else self.cpu_threads.for_next_step,
        )

    @classmethod
    def load(
        cls, name_or_path: str, device: str = "cpu", dtype: str | torch.dtype | None = None, **options: Any
    ) -> "Engine":
        """Load a registered model name, a `.gguf` file or an HF checkpoint directory.

        `options` are `EngineOptions` fields (checked before the weights are read). `quantize="int4"` or
        `"int8"` runs weight-only quantised linear layers with bf16 activations (CPU; `dtype` is
        then bf16). With neither `dtype` nor `quantize`, a checkpoint runs its default precision
        (`registry.precision`: int4 for a GGUF on CPU, else fp32); another precision adds its
        name to the model id, since outputs differ.
        """
        dtype = parse_dtype(dtype) if dtype is not None else None
        quantize = options.pop("quantize", None)
        EngineOptions.from_kwargs(options)  # bad options fail here, not after loading
        model_id, path = registry.resolve(name_or_path)
        run = registry.precision(path, device, dtype, quantize)
        model_id += run.suffix

        def build() -> "Engine":
            if device == "cpu":
                use_free_cores()  # this thread's own count: it ends with the load
            model, tokenizer, family = registry.load(path, device, run)
            release_free_memory()  # dequantizing (GGUF, ModelOpt) leaves freed temporaries in the heap
            return cls(model, tokenizer, model_id, family, **options)

        return run_in_fresh_thread(build)  # see plait.backends.runtime.openmp_teams

    # ---- what it did -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters (see `EngineStats`)."""
        with self._stats_lock:
            return replace(
                self._stats,
                decode_batches=Counter(self._stats.decode_batches),
                prompt_tokens_computed=self.scheduler.prompt_tokens_computed,
                preemptions=self.scheduler.preemptions,
                drafted_tokens=self.scheduler.drafted_tokens,
                accepted_tokens=self.scheduler.accepted_tokens,
                replayed_tokens=self.scheduler.replayed_tokens,
                forked=self.scheduler.forked_rows,
                prefill_tokens_computed=self.scheduler.prefill_tokens_computed,
            )

    def _count_pass(self, shape: torch.Size, new_tokens: torch.Tensor | None, seconds: float) -> None:
        """Count one pass of ids `shape` [rows, tokens]; `new_tokens` are the real tokens per row
        of a padded multi-row pass (None: the pass is all real tokens)."""
        rows, tokens = shape
        with self._stats_lock:
            stats = self._stats
            stats.rows_in_flight += len(self.scheduler.rows)
            stats.forward_seconds += seconds
            if tokens == 1:
                stats.decode_passes += 1
                stats.decode_tokens += rows
                stats.decode_batches[rows] += 1
            else:
                real = rows * tokens if new_tokens is None else int(new_tokens.sum())
                stats.multi_token_passes += 1
                stats.multi_token_tokens += real
                stats.multi_token_padding += rows * tokens - real

    def memory(self) -> EngineMemory:
        """A snapshot of the engine's memory and occupancy (read from any thread)."""
        cache = self.prefix_cache
        return EngineMemory(
            self.pool.nbytes(),
            self.pool.budget_bytes,
            cache.nbytes if cache is not None else 0,
            cache.budget_bytes if cache is not None else 0,
            len(self.scheduler.rows),
            len(self.scheduler.waiting),
        )

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt block (a cold start without reloading the weights).
        Call it while no request is running: the scheduler thread reads the cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # ---- scoring ---------------------------------------------------------------------------------
    def logits(self, ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(ids), vocab] of one full forward pass, no cache (the reference path)."""
        self._check_length(len(ids), 0)
        return run_in_fresh_thread(self._full_forward, ids)  # see plait.backends.runtime.openmp_teams

    @torch.inference_mode()
    def _full_forward(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids], device=self.device))[0]

    # ---- generation ------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return (
            list(prompt) if not isinstance(prompt, str) else self.tokenizer.encode(prompt, add_special=True)
        )

    def chat_prompt(self, messages: list[dict], **template_kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)

    def submit(
        self,
        prompt: str | list[int],
        *,
        constraint: TokenConstraint | None = None,
        stream: bool = False,
        share_key: Any = None,
        **sampling: Any,
    ) -> Request:
        """Queue a request and return at once; `request.wait()` or `request.deltas()` for results.

        `share_key`: callers that know two requests must give the same result (greedy or seeded,
        same prompt and grammar) pass a key; a request with the key of one still in flight gets
        that request back instead of computing it twice — DSPy's straggler re-submissions and
        identical `n>1` candidates cost one generation.

        Inside a `CancelScope` (plait.backends.runtime.cancellation) the request is registered
        with the scope, and a cancelled scope refuses new requests. A closed engine refuses
        every request (`EngineClosedError`). Several samples of one prompt: `submit_n`.
        """
        scope = self._open_scope()
        if share_key is not None and not stream:
            with self._inflight_lock:
                running = self._inflight.get(share_key)
                if running is not None and not running.done:
                    running.hold()
                    self.note_shared()
                    if scope is not None:
                        scope.register(running)
                    return running
                request = self._submit(self._request(prompt, constraint, False, sampling))
                if len(self._inflight) > 1024:
                    self._inflight = {k: r for k, r in self._inflight.items() if not r.done}
                self._inflight[share_key] = request
        else:
            request = self._submit(self._request(prompt, constraint, stream, sampling))
        if scope is not None:
            scope.register(request)
        return request

    def prefill(self, prompt: str | list[int], *, pin: bool = False, background: bool = False) -> Request:
        """Compute a prompt's whole blocks into the prefix cache and generate nothing; returns
        at once (`wait()` for the end). A later request that starts with these tokens restores
        them instead of computing them, exactly as if an earlier request had had that prompt.

        `pin`: the blocks are never evicted (a served program's instructions and demos).
        `background`: the prefill runs only while no generation request runs or waits,
        `BACKGROUND_CHUNK` tokens a pass, so it holds a request that comes up by one such pass
        at most, and then steps aside (keeping what it computed): for a later stage's prompt,
        prefilled as soon as part of it is known. Cancel it once it is of no more use.

        What is already cached is not computed again; a prompt shorter than one block has
        nothing to cache (the request ends at once). Needs the prefix cache."""
        if self.prefix_cache is None:
            raise ValueError("prefill needs the prefix cache: leave the engine's prefix_cache option on")
        scope = self._open_scope()
        ids = self.prompt_ids(prompt)
        ids = ids[: len(ids) // self.prefix_cache.block_size * self.prefix_cache.block_size]
        request = Request(ids, SamplingParams(max_tokens=1), prefill=Prefill(pin, background))
        if not ids:
            request.finish("stop")
        else:
            self._check_length(len(ids), 0)
            self.scheduler.submit(request)
            with self._stats_lock:
                self._stats.prefills += 1
        if scope is not None:
            scope.register(request)
        return request

    def submit_n(
        self,
        prompt: str | list[int],
        n: int,
        *,
        constraints: Sequence[TokenConstraint] | None = None,
        stream: bool = False,
        **sampling: Any,
    ) -> list[Request]:
        """Queue `n` samples of one prompt, computed from one prefill: the prompt runs once, then
        `n` rows decode from copies of its state (`Scheduler.submit_group`), in one batch.

        Sample i draws from its own generator: with a `seed`, seeded `seed + i`, so it gives
        exactly what a separate request with that seed gives (at a batch-invariant precision,
        fp32). Greedy samples are all the same text: unless streamed, it is computed once and
        the one request comes back `n` times (cancelled when every holder has released it).
        `constraints`: one grammar per sample (a constraint holds its own parse state), all of
        the same grammar. Inside a `CancelScope` every sample is registered with the scope.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        if constraints is not None and len(constraints) != n:
            raise ValueError(f"{len(constraints)} constraints for {n} samples: give one per sample")
        scope = self._open_scope()
        prompt = self.prompt_ids(prompt)  # tokenized once for all the samples
        per_sample = list(constraints) if constraints is not None else [None] * n
        if SamplingParams(**_given(sampling)).greedy and not stream:
            request = self._submit(self._request(prompt, per_sample[0], stream, sampling))
            for _ in range(n - 1):
                request.hold()
                self.note_shared()
            requests = [request] * n
        else:
            seed = sampling.pop("seed", None)
            seeds = [None] * n if seed is None else [seed + i for i in range(n)]
            requests = [
                self._request(prompt, constraint, stream, {**sampling, "seed": sample_seed})
                for constraint, sample_seed in zip(per_sample, seeds)
            ]
            self.scheduler.submit_group(requests)
            self._count(requests)
        if scope is not None:
            for request in requests:
                scope.register(request)
        return requests

    def _open_scope(self) -> CancelScope | None:
        """The caller's `CancelScope`, if any, once sure that the engine takes requests and that
        the scope has not been cancelled."""
        if self.closed:
            raise EngineClosedError(
                f"the {self.model_id} engine was closed (Engine.close()); load it again with "
                "Engine.load, or make a new plait.LM, which loads one when its engine is closed"
            )
        scope = current_scope()
        if scope is not None:
            scope.check()
        return scope

    def _submit(self, request: Request) -> Request:
        self.scheduler.submit(request)
        self._count([request])
        return request

    def _request(
        self,
        prompt: str | list[int],
        constraint: TokenConstraint | None,
        stream: bool,
        sampling: dict[str, Any],
    ) -> Request:
        """A checked request (prompt ids in range and within the context window)."""
        if isinstance(sampling.get("stop"), (list, str)):
            stop = sampling["stop"]
            sampling["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        params = SamplingParams(**_given(sampling))
        ids = self.prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.info.vocab_size
        bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is out of range: {self.model_id} has ids 0..{vocab - 1}")
        self._check_length(len(ids), 1)
        return Request(ids, params, constraint=constraint, stream=stream)

    def _count(self, requests: list[Request]) -> None:
        with self._stats_lock:
            self._stats.requests += len(requests)
            self._stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)

    def note_shared(self) -> None:
        """Count a request answered by another one's result (nothing computed for it)."""
        with self._stats_lock:
            self._stats.shared += 1

    def generate(self, prompt: str | list[int], **kwargs: Any) -> GenerationResult:
        """Generate from raw text or token ids (no chat template: see `chat`)."""
        return _result(self.submit(prompt, **kwargs).wait())

    def generate_n(self, prompt: str | list[int], n: int, **kwargs: Any) -> list[GenerationResult]:
        """`n` samples of raw text or token ids from one prefill (see `submit_n`)."""
        return [_result(request.wait()) for request in self.submit_n(prompt, n, **kwargs)]

    def chat(self, messages: list[dict], **kwargs: Any) -> GenerationResult:
        return self.generate(self.chat_prompt(messages), **kwargs)

    def stream(self, prompt: str | list[int], **kwargs: Any) -> Iterator[str]:
        request = self.submit(prompt, stream=True, **kwargs)
        try:
            yield from request.deltas()
        finally:
            request.cancel()

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the engine takes no more requests."""
        return self.scheduler.closed

    def close(self) -> None:
        self.scheduler.close()

    def _check_length(self, prompt_tokens: int, extra: int) -> None:
        if prompt_tokens + extra > self.max_length:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens; the context window of {self.model_id} is "
                f"{self.max_length} tokens"
            )


def _given(sampling: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings a caller gave (None: the default)."""
    return {k: v for k, v in sampling.items() if v is not None}


def _result(request: Request) -> GenerationResult:
    return GenerationResult(request.text, request.token_ids, request.finish_reason, request.usage)

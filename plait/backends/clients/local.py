"""The DSPy bridge: plait's engine behind DSPy 3.4's engine protocol.

`plait.LM("smollm2-135m")` is an ordinary `dspy.LM` whose custom engine is a `PlaitEngine`:
DSPy keeps its cache, retries, history and callbacks; every call becomes a `dspy.lm15.Request`
that we render with the checkpoint's chat template and run on the local scheduler. DSPy's
threads (Evaluate, optimizers) call `complete` concurrently, and the scheduler batches their
decode steps; their shared instructions and demos are computed once (the prefix cache).
Identical deterministic requests cost one generation: a straggler re-submitted while the
first copy is in flight joins it, and `n>1` (DSPy completes the same Request `n` times in a
row) reuses the first candidate when the request is greedy or seeded.

The model string is `plait/<model id>`, where the id is distinct per checkpoint: it is DSPy's
cache key, so two checkpoints never share cached answers.
"""

import asyncio
import contextvars
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import dspy
from dspy._vendor.lm15.types import StreamDeltaEvent, StreamEndEvent, StreamStartEvent, TextDelta
from dspy.lm15 import Message, Request, Response, TextPart, ToolCallPart, Usage

from plait.backends.clients.messages import request_messages
from plait.backends.grammar.constraint import compile_constraint
from plait.backends.grammar.spec import GrammarSpec, grammar_spec_from_request
from plait.backends.grammar.tool_calls import parse_tool_call, tool_call_grammar
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.options import ENGINE_OPTIONS
from plait.backends.runtime.request import Request as EngineRequest
from plait.errors import RequestCancelledError

DEFAULT_MAX_TOKENS = 512

_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()
# The last request completed, as (engine, Request, result): per calling thread for the sync
# engine, per asyncio task for the async one (see `complete`: DSPy's n>1 fan-out)
_last_sync = threading.local()
_last_async: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "plait_last_completed", default=None
)


def shared_engine(model: str, **options: Any) -> Engine:
    """One loaded engine per (model, options) in a process: many LMs, one copy of the weights."""
    key = (model, tuple(sorted(options.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine.load(model, **options)
        return engine


def _grammar(request: Request) -> GrammarSpec | None:
    """The request's grammar: a tool-call grammar when tools are offered, else what it asks for."""
    choice = request.config.tool_choice
    if request.tools and (choice is None or choice.mode != "none"):
        return tool_call_grammar(
            request.tools,
            required=choice is not None and choice.mode == "required",
            allowed=choice.allowed if choice is not None else (),
        )
    return grammar_spec_from_request(request)


class PlaitEngine:
    """Synchronous DSPy engine over a local plait `Engine`."""

    supports_function_calling = True  # tools offered in a Request are called under a schema grammar
    supports_reasoning = False
    supports_response_schema = True  # response_format JSON schemas are decoded under a grammar
    accepts_grammar = True  # ConstrainedAdapter's `plait_grammar` (plait.backends.grammar.constraint)
    supported_params = frozenset(
        {"temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "n", "response_format", "metadata"}
    )

    def __init__(
        self, model: str, engine_options: dict[str, Any] | None = None, *, engine: Engine | None = None
    ):
        """`engine`: an already loaded engine to run on (else the process's shared one for
        `model` and `engine_options`, loaded on first use)."""
        self.model = model
        self.engine_options = dict(engine_options or {})
        self._engine: Engine | None = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:  # loaded on first use: constructing an LM stays cheap
            self._engine = shared_engine(self.model, **self.engine_options)
        return self._engine

    # ---- protocol ---------------------------------------------------------------------------
    def submit(self, request: Request, stream: bool = False) -> EngineRequest:
        config = request.config
        prompt = self.engine.chat_prompt(request_messages(request))
        sampling = {
            "max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
            "temperature": config.temperature if config.temperature is not None else 0.0,
            "top_p": config.top_p,
            "top_k": config.top_k,
            "seed": config.seed,
            "stop": tuple(config.stop) or None,
        }
        spec = _grammar(request)
        constraint = None
        if spec is not None:
            engine = self.engine
            constraint = compile_constraint(
                spec, engine.tokenizer, engine.info.vocab_size, max_tokens=sampling["max_tokens"]
            )
        share_key = None
        if _deterministic(request):
            share_key = (prompt, tuple(sorted(sampling.items())), spec.key if spec is not None else None)
        return self.engine.submit(
            prompt, stream=stream, share_key=share_key, constraint=constraint, **sampling
        )

    def complete(self, request: Request) -> Response:
        """One candidate. DSPy asks for `n` candidates by completing the same Request object `n`
        times in a row on the calling thread; when the request is deterministic (greedy or
        seeded) every candidate is the first one, so it is computed once. Sampled requests are
        computed every time: each draws its own sample."""
        handle = _repeated(getattr(_last_sync, "done", None), self, request, self.engine)
        if handle is None:
            handle = self.submit(request).wait()
        _last_sync.done = (self, request, handle)  # holding the Request keeps its id from being reused
        return self._response(request, handle)

    def stream(self, request: Request) -> Iterator:
        handle = self.submit(request, stream=True)
        yield StreamStartEvent(id=None, model=request.model)
        try:
            for piece in handle.deltas():
                yield StreamDeltaEvent(TextDelta(piece))
        finally:
            handle.cancel()
        yield StreamEndEvent(finish_reason=_finish(handle), usage=_usage(handle))

    def close(self) -> None:
        """The loaded engine is shared by every LM of this model; it lives for the process."""

    # ---- saving (dspy.LM.dump_state / load_state) -------------------------------------------
    def dump_state(self) -> dict[str, Any]:
        return {"model": self.model, "engine_options": self.engine_options}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> "PlaitEngine":
        return cls(state["model"], state.get("engine_options"))

    def _response(self, request: Request, handle: EngineRequest) -> Response:
        if handle.finish_reason == "cancelled":  # its CancelScope ended it: the program stops here
            raise RequestCancelledError("the LM call was cancelled (its client went away)")
        finish = _finish(handle)
        call = parse_tool_call(handle.text) if request.tools and finish == "stop" else None
        if call is not None:
            name, arguments = call
            part = ToolCallPart(id=f"call_{uuid.uuid4().hex[:12]}", name=name, input=arguments)
            return Response(
                id=None,
                model=request.model,
                message=Message.assistant([part]),
                finish_reason="tool_call",
                usage=_usage(handle),
            )
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([TextPart(handle.text)]),
            finish_reason=finish,
            usage=_usage(handle),
        )


def _repeated(last: tuple | None, owner: Any, request: Request, engine: Engine) -> EngineRequest | None:
    """The finished handle to answer `request` with again, when `last` (owner, Request, handle)
    was this very deterministic request on this owner (DSPy's n>1 fan-out); counted as shared."""
    if last is None or last[0] is not owner or last[1] is not request or not _deterministic(request):
        return None
    engine.note_shared()
    return last[2]


def _deterministic(request: Request) -> bool:
    """Whether two runs of `request` must give the same text: greedy, or sampled with a seed."""
    config = request.config
    return not config.temperature or config.seed is not None


def _finish(handle: EngineRequest) -> str:
    return "length" if handle.finish_reason == "length" else "stop"


def _usage(handle: EngineRequest) -> Usage:
    u = handle.usage
    return Usage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens)


class AsyncPlaitEngine:
    """The async twin: waits for the scheduler without blocking the event loop."""

    def __init__(self, sync: PlaitEngine):
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        """One candidate; like the sync engine, the `n` candidates of a deterministic request
        (completed one after another in the same task) are computed once."""
        handle = _repeated(_last_async.get(), self, request, self.sync.engine)
        if handle is None:
            handle = await asyncio.to_thread(self.sync.submit, request)
            await asyncio.to_thread(handle.wait)
        _last_async.set((self, request, handle))
        return self.sync._response(request, handle)

    async def stream(self, request: Request) -> AsyncIterator:
        events = self.sync.stream(request)
        done = object()
        try:
            while (event := await asyncio.to_thread(next, events, done)) is not done:
                yield event
        finally:
            events.close()

    async def aclose(self) -> None:
        self.sync.close()

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> "AsyncPlaitEngine":
        return cls(PlaitEngine.load_state(state))


def LM(
    name_or_path: str = "smollm2-135m",
    *,
    device: str = "cpu",
    dtype: str | None = None,
    quantize: str | None = None,
    **defaults: Any,
) -> dspy.LM:
    """A ready `dspy.LM` running on plait's local engine.

    `quantize="int4"` or `"int8"` runs weight-only quantised linear layers (CPU, see
    `Engine.load`); the model string gets the scheme as a suffix, so DSPy's cache keeps the
    variants apart. Keywords that name `EngineOptions` fields (max_batch_size,
    memory_budget_mb, step_tokens, ...) configure the engine; the other `defaults` are DSPy's
    LM settings (temperature, max_tokens, cache, ...).
    `LM("http://host:port/v1", model="...")` runs on an OpenAI-compatible server instead
    (vLLM, SGLang, NIM or `plait serve`): see `plait.backends.clients.remote.remote_lm`.
    """
    if name_or_path.startswith(("http://", "https://")):
        from plait.backends.clients.remote import remote_lm

        served = defaults.pop("model", None)
        if served is None:
            raise ValueError("a remote LM needs the served model's name: plait.LM(url, model=...)")
        return remote_lm(name_or_path, served, **defaults)
    from plait.backends.loading.registry import resolve, variant_id

    model_id, _ = resolve(name_or_path)
    options: dict[str, Any] = {"device": device}
    options |= {name: defaults.pop(name) for name in ENGINE_OPTIONS if name in defaults}
    if dtype is not None:
        options["dtype"] = dtype
    if quantize is not None:
        options["quantize"] = quantize
    engine = PlaitEngine(name_or_path, options)
    defaults.setdefault("num_retries", 0)  # a local engine has no transient network errors to retry
    return dspy.LM(
        f"plait/{variant_id(model_id, quantize)}",
        engine=engine,
        async_engine=AsyncPlaitEngine(engine),
        **defaults,
    )

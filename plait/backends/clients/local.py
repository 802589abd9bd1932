"""The DSPy bridge: plait's engine behind DSPy 3.4's engine protocol.

`plait.LM("smollm2-135m")` is an ordinary `dspy.LM` whose custom engine is a `PlaitEngine`:
DSPy keeps its cache, retries, history and callbacks; every call becomes a `dspy.lm15.Request`
that we render with the checkpoint's chat template and run on the local scheduler. DSPy's
threads (Evaluate, optimizers) call `complete` concurrently, and the scheduler batches their
decode steps; their shared instructions and demos are computed once (the prefix cache).
Identical deterministic requests cost one generation: a straggler re-submitted while the
first copy is in flight joins it, and `n>1` (DSPy completes the same Request `n` times in a
row) reuses the first candidate when the request is greedy or seeded. The `n` candidates of a
sampled request come from one prefill (`Engine.submit_n`): DSPy's engine protocol never says
`n`, so the LM carries a callback (`CandidateCount`) that reads it from the call.

The model string is `plait/<model id>`, where the id is distinct per checkpoint: it is DSPy's
cache key, so two checkpoints never share cached answers.
"""

import asyncio
import contextlib
import contextvars
import json
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dspy
from dspy._vendor.lm15.types import (
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
)
from dspy.lm15 import ContextLengthError as LM15ContextLengthError
from dspy.lm15 import (
    InvalidRequestError,
    Message,
    Request,
    Response,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    Usage,
)
from dspy.utils.callback import BaseCallback

from plait.backends.clients.features import (
    refuse_text_completions,
    refuse_unsupported_settings,
    text_conversation,
)
from plait.backends.clients.messages import template_messages
from plait.backends.grammar.reasoning import ReasoningRequest
from plait.backends.grammar.spec import GrammarError, GrammarSpec, grammar_spec_from_request
from plait.backends.grammar.tool_formats import ParsedTurn, ToolFormat, tool_specs
from plait.backends.runtime.engine import Engine
from plait.backends.runtime.options import ENGINE_OPTIONS
from plait.backends.runtime.request import Request as EngineRequest
from plait.backends.runtime.turn import ChatTurn, plan_turn
from plait.errors import ContextLengthError, RequestCancelledError

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
    """One loaded engine per (model, options) in a process: many LMs, one copy of the weights.
    One that was closed is loaded again: an LM made or called after someone closed it works."""
    key = (model, tuple(sorted(options.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or engine.closed:
            engine = _engines[key] = Engine.load(model, **options)
        return engine


def _calls_tools(request: Request) -> bool:
    """Whether the answer may call the request's tools (it offers some, `tool_choice` not none)."""
    choice = request.config.tool_choice
    return bool(request.tools) and (choice is None or choice.mode != "none")


def _grammar(request: Request, fmt: ToolFormat, max_tokens: int) -> GrammarSpec | None:
    """The request's grammar: when it may call tools, calls in the model's own format `fmt` or
    (unless a call is required) the answer it asks for otherwise; else what it asks for."""
    answer = grammar_spec_from_request(request)
    if not _calls_tools(request):
        return answer
    choice = request.config.tool_choice
    return fmt.grammar(
        request.tools,
        required=choice is not None and choice.mode == "required",
        allowed=choice.allowed if choice is not None else (),
        parallel=choice is None or choice.parallel is not False,
        answer=answer,
        max_tokens=max_tokens,
    )


def _answer_parts(parsed: ParsedTurn) -> list[TextPart | ToolCallPart]:
    """An answer's leading text (when not blank) and its tool calls, as message parts."""
    text = [TextPart(parsed.text)] if parsed.text.strip() else []
    calls = [
        ToolCallPart(id=f"call_{uuid.uuid4().hex[:12]}", name=c.name, input=c.arguments) for c in parsed.calls
    ]
    return [*text, *calls]


@dataclass(frozen=True)
class LocalCall:
    """One submitted DSPy request: its planned turn (to read the output back) and handle."""

    turn: ChatTurn
    handle: EngineRequest
    tools: ToolFormat | None = None  # the format of the calls the answer may hold (None: none)

    def parse(self, request: Request, text: str) -> ParsedTurn:
        """The answer's leading text and the tool calls it holds."""
        return self.tools.parse(text, request.tools) if self.tools is not None else ParsedTurn(text)


class Candidates:
    """The candidates of one DSPy LM call with `n>1`. DSPy completes the same Request `n`
    times in a row; the first completion of a sampled one submits all `n` as one group (one
    prefill) and each completion takes the next. Those not taken when the call ends (a
    failed call) are cancelled."""

    def __init__(self, n: int):
        self.n = n
        self._request: Request | None = None
        self._calls: deque[LocalCall] = deque()

    def take(self, request: Request, start: Callable[[], list[LocalCall]]) -> LocalCall:
        """The next candidate of `request`, starting a group with `start` when none is left
        (a new Request, or a retry after the `n` were taken)."""
        if request is not self._request or not self._calls:
            self._request, self._calls = request, deque(start())
        return self._calls.popleft()

    def cancel_rest(self) -> None:
        while self._calls:
            self._calls.popleft().handle.cancel()


_candidates: contextvars.ContextVar[Candidates | None] = contextvars.ContextVar(
    "plait_candidates", default=None
)

TextObserver = Callable[[str | None], None]
_observers: contextvars.ContextVar[Callable[[], TextObserver] | None] = contextvars.ContextVar(
    "plait_text_observers", default=None
)


@contextlib.contextmanager
def observing(make_observer: Callable[[], TextObserver]) -> Iterator[None]:
    """Within this block (this thread or task, and threads started with a copy of its
    context), each call `complete`s on plait's local engine gets an observer of its own from
    `make_observer`, streams its answer's text to it as it is generated (on the calling
    thread), then calls it with None once the answer is whole, before the call returns: a
    program can act on part of an answer (an output field the grammar has closed) while the
    rest is generated. Thinking text is not passed on. Calls DSPy answers from its cache run
    no engine and pass nothing."""
    token = _observers.set(make_observer)
    try:
        yield
    finally:
        _observers.reset(token)


class CandidateCount(BaseCallback):
    """Reads `n` from each call of the LM it is attached to (the call's keywords over the LM's
    defaults) and, when above 1, holds a `Candidates` for that call in a context variable the
    engine reads. Callbacks run on the caller's thread or task, in the call's context."""

    def __init__(self) -> None:
        self._tokens: dict[str, contextvars.Token] = {}

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        n = {**instance.kwargs, **inputs.get("kwargs", {})}.get("n") or 1
        if n > 1:
            self._tokens[call_id] = _candidates.set(Candidates(n))

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        token = self._tokens.pop(call_id, None)
        if token is not None:
            _candidates.get().cancel_rest()
            _candidates.reset(token)


class PlaitEngine:
    """Synchronous DSPy engine over a local plait `Engine`."""

    supports_function_calling = True  # tools offered in a Request are called under a schema grammar
    supports_response_schema = True  # response_format JSON schemas are decoded under a grammar
    accepts_grammar = True  # ConstrainedAdapter's `plait_grammar` (plait.backends.grammar.constraint)
    supported_params = frozenset(
        {"temperature", "max_tokens", "top_p", "top_k", "stop", "seed", "n", "response_format", "metadata"}
    )

    def __init__(
        self,
        model: str,
        engine_options: dict[str, Any] | None = None,
        *,
        engine: Engine | None = None,
        reasoning: Any = None,
    ):
        """`engine`: an already loaded engine to run on (else the process's shared one for
        `model` and `engine_options`, loaded on first use). `reasoning`: the thinking default
        of every call (None, "on", "off", an effort word or a token budget); a call's own
        `reasoning_effort` overrides it."""
        self.model = model
        self.engine_options = dict(engine_options or {})
        self._engine: Engine | None = engine
        self._shared = engine is None  # on the process's shared engine (loaded again if closed)
        self.reasoning = ReasoningRequest.parse(reasoning)

    @property
    def supports_reasoning(self) -> bool:
        """Whether the checkpoint's chat template has a thinking block (DSPy then sends
        `reasoning_effort`, and reads `dspy.Reasoning` fields from the native reasoning)."""
        return self.engine.reasoning_format is not None

    @property
    def engine(self) -> Engine:
        # loaded on first use: constructing an LM stays cheap
        if self._engine is None or (self._shared and self._engine.closed):
            self._engine = shared_engine(self.model, **self.engine_options)
        return self._engine

    # ---- protocol ---------------------------------------------------------------------------
    def submit(self, request: Request, stream: bool = False) -> EngineRequest:
        """The engine request of a DSPy request (see `start`)."""
        return self.start(request, stream).handle

    def start(self, request: Request, stream: bool = False) -> LocalCall:
        """Render, plan the thinking block and submit a DSPy request. What plait does not do is
        refused first (`plait.backends.clients.features`); a request plait cannot run as asked
        (a bad grammar or sampling setting, a prompt over the context window) raises the lm15
        error DSPy expects, not an engine failure."""
        with _lm15_errors(request):
            turn, sampling, tools = self._plan(request)
            engine = self.engine
            share_key = None
            if _deterministic(request):
                grammar = turn.spec.key if turn.spec is not None else None
                share_key = (turn.prompt, tuple(sorted(sampling.items())), grammar)
            constraint = turn.constraint(engine, sampling["max_tokens"])
            handle = engine.submit(
                turn.prompt, stream=stream, share_key=share_key, constraint=constraint, **sampling
            )
            return LocalCall(turn, handle, tools)

    def start_n(self, request: Request, n: int) -> list[LocalCall]:
        """`n` candidates of a sampled DSPy request from one prefill (`Engine.submit_n`)."""
        with _lm15_errors(request):
            turn, sampling, tools = self._plan(request)
            engine = self.engine
            constraints = None
            if turn.spec is not None:
                constraints = [turn.constraint(engine, sampling["max_tokens"]) for _ in range(n)]
            handles = engine.submit_n(turn.prompt, n, constraints=constraints, **sampling)
            return [LocalCall(turn, handle, tools) for handle in handles]

    def _plan(self, request: Request) -> tuple[ChatTurn, dict[str, Any], ToolFormat | None]:
        """The request's turn (rendered prompt, grammar, thinking block), its sampling settings,
        and the format of the tool calls its answer may hold (None: none)."""
        config = request.config
        engine = self.engine
        sampling = {
            "max_tokens": config.max_tokens or DEFAULT_MAX_TOKENS,
            "temperature": config.temperature if config.temperature is not None else 0.0,
            "top_p": config.top_p,
            "top_k": config.top_k,
            "seed": config.seed,
            "stop": tuple(config.stop) or None,
        }
        fmt = engine.tool_format
        messages, template_kwargs = template_messages(
            text_conversation(request), tool_specs(request.tools), fmt
        )
        turn = plan_turn(
            engine,
            messages,
            reasoning=self.reasoning.merged(ReasoningRequest.from_dspy(request.config.reasoning)),
            spec=_grammar(request, fmt, sampling["max_tokens"]),
            max_tokens=sampling["max_tokens"],
            template_kwargs=template_kwargs,
        )
        return turn, sampling, fmt if _calls_tools(request) else None

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of the prompt a call with these chat messages (OpenAI's form, text
        only, no tools) is rendered to, as `start` renders it."""
        engine = self.engine
        rendered, template_kwargs = template_messages(messages, (), engine.tool_format)
        turn = plan_turn(
            engine,
            rendered,
            reasoning=self.reasoning,
            max_tokens=DEFAULT_MAX_TOKENS,
            template_kwargs=template_kwargs,
        )
        return engine.prompt_ids(turn.prompt)

    def prefill(self, prompt_ids: list[int], *, pin: bool = False, background: bool = False) -> EngineRequest:
        """Compute a prompt's blocks into the engine's prefix cache ahead of the call that will
        need them (`Engine.prefill`): a later call whose prompt starts with these tokens
        restores them instead."""
        return self.engine.prefill(prompt_ids, pin=pin, background=background)

    def next_call(self, request: Request) -> LocalCall:
        """The call that answers one completion of `request`: a candidate of its `n>1` group
        when the LM's call asked for several sampled ones, else a request of its own."""
        candidates = _candidates.get()
        if candidates is not None and not _deterministic(request):
            return candidates.take(request, lambda: self.start_n(request, candidates.n))
        return self.start(request)

    def complete(self, request: Request) -> Response:
        """One candidate. DSPy asks for `n` candidates by completing the same Request object `n`
        times in a row on the calling thread; when the request is deterministic (greedy or
        seeded) every candidate is the first one, so it is computed once. The candidates of a
        sampled request each draw their own sample, all from one prefill (`next_call`)."""
        call = _repeated(getattr(_last_sync, "done", None), self, request, self.engine)
        make_observer = _observers.get()
        if call is None and make_observer is not None:
            call = self._observed(request, make_observer())
        elif call is None:
            call = self.next_call(request)
            call.handle.wait()
        _last_sync.done = (self, request, call)  # holding the Request keeps its id from being reused
        return self._response(request, call)

    def _observed(self, request: Request, observer: TextObserver) -> LocalCall:
        """Run `request` streamed, its answer text passed to `observer` as it comes."""
        call = self.start(request, stream=True)
        splitter = call.turn.stream_splitter()
        try:
            for piece in call.handle.deltas():
                answer = splitter.feed(piece)[1] if splitter else piece
                if answer:
                    observer(answer)
            if splitter is not None and (rest := splitter.flush()[1]):
                observer(rest)
            observer(None)
        finally:
            call.handle.cancel()  # a no-op once it has ended; stops it if the observer raised
        call.handle.wait()
        return call

    def stream(self, request: Request) -> Iterator:
        """Thinking and answer deltas as they come; an answer that may call tools is held back
        and sent once read: its text, then each call whole."""
        call = self.start(request, stream=True)
        handle, splitter = call.handle, call.turn.stream_splitter()
        held = None if call.tools is None else []
        yield StreamStartEvent(id=None, model=request.model)
        try:
            for piece in handle.deltas():
                yield from _delta_events(splitter.feed(piece) if splitter else ("", piece), held)
            if splitter is not None:
                yield from _delta_events(splitter.flush(), held)
        finally:
            handle.cancel()
        finish = _finish(handle)
        if held is not None:
            parsed = call.parse(request, "".join(held))
            for i, part in enumerate(_answer_parts(parsed)):
                if isinstance(part, TextPart):
                    yield StreamDeltaEvent(TextDelta(part.text))
                else:
                    delta = ToolCallDelta(json.dumps(part.input), part_index=i, id=part.id, name=part.name)
                    yield StreamDeltaEvent(delta)
            finish = "tool_call" if parsed.calls else finish
        yield StreamEndEvent(finish_reason=finish, usage=_usage(handle))

    def close(self) -> None:
        """The loaded engine is shared by every LM of this model; it lives for the process."""

    # ---- saving (dspy.LM.dump_state / load_state) -------------------------------------------
    def dump_state(self) -> dict[str, Any]:
        state = {"model": self.model, "engine_options": self.engine_options}
        if self.reasoning.mode != "default":
            state["reasoning"] = self.reasoning.setting()
        return state

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> "PlaitEngine":
        return cls(state["model"], state.get("engine_options"), reasoning=state.get("reasoning"))

    def _response(self, request: Request, call: LocalCall) -> Response:
        handle = call.handle
        if handle.finish_reason == "cancelled":  # its CancelScope ended it: the program stops here
            raise RequestCancelledError("the LM call was cancelled (its client went away)")
        finish = _finish(handle)
        reasoning, text = call.turn.split(handle.text)
        thinking = [ThinkingPart(reasoning)] if reasoning else []
        parsed = call.parse(request, text)
        if parsed.calls:
            return Response(
                id=None,
                model=request.model,
                message=Message.assistant([*thinking, *_answer_parts(parsed)]),
                finish_reason="tool_call",
                usage=_usage(handle),
            )
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant([*thinking, TextPart(text)]),
            finish_reason=finish,
            usage=_usage(handle),
        )


@contextlib.contextmanager
def _lm15_errors(request: Request) -> Iterator[None]:
    """Refuse what plait does not do, and raise plait's refusals of a request as the lm15
    errors DSPy expects (a context overflow ReAct trims and retries; an invalid request DSPy
    does not retry)."""
    refuse_unsupported_settings(request)
    try:
        yield
    except ContextLengthError as exc:
        raise LM15ContextLengthError(str(exc), provider="plait") from exc
    except (GrammarError, ValueError) as exc:
        raise InvalidRequestError(str(exc), provider="plait") from exc


def _delta_events(pieces: tuple[str, str], held: list[str] | None = None) -> Iterator[StreamDeltaEvent]:
    """Stream events for one (reasoning, answer) pair of pieces: thinking is part 0. The answer
    goes to `held` instead, when given."""
    thought, answer = pieces
    if thought:
        yield StreamDeltaEvent(ThinkingDelta(thought))
    if answer and held is not None:
        held.append(answer)
    elif answer:
        yield StreamDeltaEvent(TextDelta(answer))


def _repeated(last: tuple | None, owner: Any, request: Request, engine: Engine) -> LocalCall | None:
    """The finished call to answer `request` with again, when `last` (owner, Request, call)
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
    """DSPy's usage of a call; prompt tokens restored from the prefix cache are its cache reads."""
    u = handle.usage
    return Usage(
        input_tokens=u.prompt_tokens,
        output_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        cache_read_tokens=u.cached_tokens,
    )


class AsyncPlaitEngine:
    """The async twin: waits for the scheduler without blocking the event loop."""

    def __init__(self, sync: PlaitEngine):
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        """One candidate; like the sync engine, the `n` candidates of a deterministic request
        (completed one after another in the same task) are computed once."""
        call = _repeated(_last_async.get(), self, request, self.sync.engine)
        make_observer = _observers.get()
        if call is None and make_observer is not None:  # the thread gets a copy of this context
            call = await asyncio.to_thread(self.sync._observed, request, make_observer())
        elif call is None:
            call = await asyncio.to_thread(self.sync.next_call, request)
            await asyncio.to_thread(call.handle.wait)
        _last_async.set((self, request, call))
        return self.sync._response(request, call)

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
    reasoning: Any = None,
    **defaults: Any,
) -> dspy.LM:
    """A ready `dspy.LM` running on plait's local engine.

    `reasoning`: the thinking block of a model whose template has one (Nemotron): None (the
    template's default), "on", "off", an effort word ("low", "medium", ...) or a token budget
    after which `</think>` is forced (see `plait.backends.grammar.reasoning`); a call's own
    `reasoning_effort` overrides it. It is part of the model string, so DSPy's cache keeps
    the settings apart.

    `dtype` ("fp32", "bf16") or `quantize` ("int4", "int8": weight-only quantised linear
    layers on CPU) choose the precision; with neither, the checkpoint's default runs (int4 for
    the embedded GGUF on CPU, see `Engine.load`). Any other precision is a suffix of the model
    string, so DSPy's cache keeps the variants apart. Keywords that name `EngineOptions`
    fields (max_batch_size, memory_budget_mb, step_tokens, ...) configure the engine; the
    other `defaults` are DSPy's LM settings (temperature, max_tokens, cache, ...).
    `LM("http://host:port/v1", model="...")` runs on an OpenAI-compatible server instead
    (vLLM, SGLang, NIM or `plait serve`): see `plait.backends.clients.remote.remote_lm`.
    """
    if name_or_path.startswith(("http://", "https://")):
        from plait.backends.clients.remote import remote_lm

        served = defaults.pop("model", None)
        if served is None:
            raise ValueError("a remote LM needs the served model's name: plait.LM(url, model=...)")
        return remote_lm(name_or_path, served, reasoning=reasoning, **defaults)
    from plait.backends.loading.registry import precision, resolve
    from plait.backends.models.dtypes import parse_dtype

    refuse_text_completions(defaults)
    model_id, path = resolve(name_or_path)
    suffix = precision(path, device, None if dtype is None else parse_dtype(dtype), quantize).suffix
    options: dict[str, Any] = {"device": device}
    options |= {name: defaults.pop(name) for name in ENGINE_OPTIONS if name in defaults}
    if dtype is not None:
        options["dtype"] = dtype
    if quantize is not None:
        options["quantize"] = quantize
    engine = PlaitEngine(name_or_path, options, reasoning=reasoning)
    defaults.setdefault("num_retries", 0)  # a local engine has no transient network errors to retry
    defaults["callbacks"] = [*defaults.get("callbacks", []), CandidateCount()]  # n>1: one prefill
    return dspy.LM(
        f"plait/{model_id}{suffix}{engine.reasoning.model_suffix()}",
        engine=engine,
        async_engine=AsyncPlaitEngine(engine),
        **defaults,
    )

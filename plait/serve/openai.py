"""OpenAI-compatible `/v1/chat/completions`, `/v1/completions` and `/v1/models` over the engine.

Any OpenAI client (the `openai` SDK, LiteLLM, DSPy, plait's own remote engine) can use a
plait server as its backend. What is supported:

- sampling: `max_tokens` / `max_completion_tokens`, `temperature` (default 1, as OpenAI),
  `top_p`, `top_k` (vLLM's extra; -1 or 0 = off), `seed`, `stop`, `n`;
- streaming (`stream: true`) as SSE chunks ending with `data: [DONE]`, with a final usage
  chunk when `stream_options.include_usage` is set;
- structured outputs in every dialect `plait.serve.structured` reads (OpenAI
  `response_format`, vLLM `guided_*` / `structured_outputs`, plait's `plait_grammar`):
  the answer is decoded under the grammar, so it always parses;
- tool calls (`tools`, `tool_choice`, `parallel_tool_calls`; history with assistant
  `tool_calls` and `tool` messages): decoded in the model's own format under a grammar and
  answered as OpenAI `tool_calls` (`plait.serve.tools`); a stream sends them in one delta at
  the end.

Not supported, and refused with 400 rather than ignored: logprobs, `echo`, `suffix`, tools on
raw completions, non-text message parts. Every call is admitted through the gate, run off the
event loop, counted in `/metrics` and traced to the store. A client that goes away (streamed or
not) cancels every generation of its call, and the call's admission slot comes back only once
the engine has stopped them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from plait.backends.clients.messages import template_messages
from plait.backends.grammar.reasoning import ReasoningError, ReasoningRequest
from plait.backends.grammar.tool_formats import ParsedTurn
from plait.backends.runtime.turn import ChatTurn, plan_turn
from plait.serve.bridge import iterate_in_thread, unless_client_leaves
from plait.serve.errors import ApiError, api_error_for, read_json
from plait.serve.runtime import ServedModel, ServeRuntime
from plait.serve.sse import SSE_HEADERS, GuardedStream, sse
from plait.serve.structured import grammar_from_request
from plait.serve.tools import ToolUse, openai_tool_calls, tool_use
from plait.serve.tracing import Trace

#: Seconds a worker waits beyond the request timeout before giving up on its thread.
_GRACE = 5.0


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are allowed (clients send many)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # thinking (chat only): OpenAI's effort word, vLLM/SGLang's template kwargs, NIM's and
    # vLLM's budget names; see `_reasoning`
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    max_thinking_tokens: int | None = Field(None, ge=0)
    thinking_token_budget: int | None = Field(None, ge=0)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None


@dataclass
class _Choice:
    """One generation of a request: its engine handle, index, and the turn it answers (a
    chat's: it splits the thinking block from the answer; None for a raw completion)."""

    index: int
    handle: Any
    turn: ChatTurn | None = None
    tools: ToolUse | None = None  # the tools the answer may call

    @functools.cached_property
    def answer(self) -> tuple[str | None, ParsedTurn]:
        """(reasoning, the answer's text and tool calls) of the finished generation."""
        reasoning, content = self.turn.split(self.handle.text) if self.turn else (None, self.handle.text)
        return reasoning, self.tools.parse(content) if self.tools is not None else ParsedTurn(content)

    def message(self) -> dict[str, Any]:
        """The chat answer: content, `tool_calls` when it calls tools, and `reasoning_content`
        when the turn had a thinking block."""
        reasoning, parsed = self.answer
        answer: dict[str, Any] = {"role": "assistant", "content": parsed.text}
        if parsed.calls:
            answer |= {"content": parsed.text or None, "tool_calls": openai_tool_calls(parsed)}
        if reasoning is not None:
            answer["reasoning_content"] = reasoning
        return answer

    def finish(self) -> str:
        return "tool_calls" if self.turn is not None and self.answer[1].calls else _finish(self.handle)


#: Template arguments plait sets itself: `chat_template_kwargs` may not replace them.
_RESERVED_TEMPLATE_ARGS = frozenset({"messages", "add_generation_prompt", "tools", "bos_token", "eos_token"})


def _reasoning(params: _Sampling) -> ReasoningRequest:
    """The thinking a chat call asks for: a budget (`max_thinking_tokens`, NIM's name, or
    `thinking_token_budget`, vLLM's) wins over `reasoning_effort`; neither: the default."""
    budget = params.max_thinking_tokens
    if budget is None:
        budget = params.thinking_token_budget
    try:
        if budget is not None:
            return ReasoningRequest("on", budget)
        return ReasoningRequest.parse(params.reasoning_effort)
    except ReasoningError as exc:
        raise ApiError(400, str(exc), code="invalid_reasoning") from None


def _template_kwargs(params: _Sampling) -> dict[str, Any]:
    kwargs = dict(params.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_ARGS & kwargs.keys())
    if reserved or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        shown = ", ".join(reserved) or "keys that are not identifiers"
        raise ApiError(400, f"chat_template_kwargs may not set {shown}", code="invalid_chat_template_kwargs")
    return kwargs


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(p) for p in error.get("loc", ())) or "body"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        raise ApiError(422, "invalid request: " + "; ".join(problems), code="invalid_request") from None


def _refuse_unsupported(params: _Sampling) -> None:
    if isinstance(params, CompletionBody) and (params.tools or params.tool_choice is not None):
        raise ApiError(
            400,
            "tools apply to chat completions, not raw prompts: use /v1/chat/completions",
            code="unsupported_tools",
        )
    if params.logprobs:
        raise ApiError(400, "logprobs are not supported by this server", code="unsupported_logprobs")
    thinking = (params.reasoning_effort, params.chat_template_kwargs, params.max_thinking_tokens)
    if isinstance(params, CompletionBody) and any(
        v is not None for v in (*thinking, params.thinking_token_budget)
    ):
        raise ApiError(
            400, "reasoning settings apply to chat completions, not raw prompts", code="unsupported_parameter"
        )
    if isinstance(params, CompletionBody) and (params.echo or params.suffix):
        raise ApiError(400, "echo and suffix are not supported by this server", code="unsupported_parameter")


def _sampling(
    params: _Sampling, runtime: ServeRuntime, model: ServedModel, prompt_tokens: int
) -> dict[str, Any]:
    limit = runtime.config.max_tokens_limit
    room = max(1, model.engine.max_length - prompt_tokens)
    max_tokens = params.max_completion_tokens or params.max_tokens
    if max_tokens is not None and max_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} is over this server's limit of {limit}",
            code="max_tokens_too_large",
        )
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    if len(stop) > 16 or any(not s for s in stop):
        raise ApiError(400, "stop takes at most 16 non-empty strings", code="invalid_stop")
    return {
        "max_tokens": min(max_tokens or limit, room),
        "temperature": 1.0 if params.temperature is None else params.temperature,
        "top_p": params.top_p,
        "top_k": None if params.top_k is None else max(params.top_k, 0),
        "seed": params.seed,
        "stop": tuple(stop) or None,
    }


def _prompts(body: CompletionBody) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # one tokenized prompt
    if not prompt:
        raise ApiError(422, "invalid request: prompt is empty", code="invalid_request")
    return list(prompt)


def _finish(handle: Any) -> str:
    return "length" if handle.finish_reason == "length" else "stop"


def _usage(choices: list[_Choice]) -> dict[str, Any]:
    prompt = sum(c.handle.usage.prompt_tokens for c in choices)
    completion = sum(c.handle.usage.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _plait_usage(choices: list[_Choice]) -> dict[str, Any]:
    """plait's extra accounting: how many tokens the grammar forced instead of sampling, the
    passes, the cached prompt tokens, and speculative decoding's drafted and accepted tokens."""
    keys = (
        "sampled_tokens",
        "forced_tokens",
        "forward_passes",
        "cached_tokens",
        "drafted_tokens",
        "accepted_tokens",
    )
    return {k: sum(int(getattr(c.handle.usage, k, 0) or 0) for c in choices) for k in keys}


class _Call:
    """One OpenAI-style request from parsing to answer: shared by both endpoints."""

    def __init__(self, runtime: ServeRuntime, kind: Literal["chat", "completion"], body: _Sampling):
        self.runtime, self.kind, self.body = runtime, kind, body
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.target = "openai:chat.completions" if kind == "chat" else "openai:completions"
        self.model = runtime.model(body.model)
        self.spec = grammar_from_request(body.model_dump(exclude_unset=True))
        fmt = self.model.engine.tool_format
        self.tools = tool_use(body.model_dump(include={"tools", "tool_choice", "parallel_tool_calls"}), fmt)
        self.choices: list[_Choice] = []
        self.cancelled = False  # nobody waits for the answer: what is (or gets) submitted stops
        self._submitted = threading.Event()  # `submit` has returned: no handle is added after

    # ---- submitting (on a worker thread: tokenizing a long prompt takes time) ----------------
    def _turns(self) -> list[tuple[str | list[int], ChatTurn | None]]:
        """Each prompt to run, with its planned chat turn (None for a raw completion)."""
        body = self.body
        if not isinstance(body, ChatBody):
            return [(prompt, None) for prompt in _prompts(body)]
        engine, tools = self.model.engine, self.tools
        messages, tool_kwargs = template_messages(
            [m.model_dump(exclude_none=True) for m in body.messages],
            tools.specs if tools is not None else (),
            engine.tool_format,
        )
        max_tokens = body.max_completion_tokens or body.max_tokens or self.runtime.config.max_tokens_limit
        turn = plan_turn(
            engine,
            messages,
            reasoning=_reasoning(body),
            spec=tools.grammar(self.spec, max_tokens) if tools is not None else self.spec,
            max_tokens=max_tokens,
            template_kwargs=_template_kwargs(body) | tool_kwargs,
        )
        return [(turn.prompt, turn)]

    def submit(self, stream: bool) -> None:
        engine = self.model.engine
        try:
            for prompt, turn in self._turns():
                ids = engine.prompt_ids(prompt)
                sampling = _sampling(self.body, self.runtime, self.model, len(ids))
                # n samples from one prefill, sample i seeded seed + i (n samples, not n copies)
                constraints = [self._constraint(turn, sampling["max_tokens"]) for _ in range(self.body.n)]
                handles = engine.submit_n(
                    ids, self.body.n, constraints=constraints, stream=stream, **sampling
                )
                for handle in handles:
                    self.choices.append(_Choice(len(self.choices), handle, turn, self.tools))
                    if self.cancelled:  # cancelled while submitting: `cancel` may not have seen it
                        handle.cancel()
        except ValueError as exc:  # SamplingParams / an empty prompt
            self.cancel()
            raise ApiError(400, str(exc), code="invalid_request") from None
        except BaseException:
            self.cancel()
            raise
        finally:
            self._submitted.set()

    def _constraint(self, turn: ChatTurn | None, max_tokens: int) -> Any:
        """The grammar of one generation (a chat turn's covers its thinking block too); a JSON
        answer gets budgets that make it close within `max_tokens`."""
        engine = self.model.engine  # masks as wide as the logits
        if turn is not None:
            return turn.constraint(engine, max_tokens)
        if self.spec is None:
            return None
        from plait.backends.grammar.constraint import compile_constraint

        return compile_constraint(self.spec, engine.tokenizer, engine.info.vocab_size, max_tokens=max_tokens)

    @property
    def sequences(self) -> int:
        """Engine sequences the call runs: each prompt, `n` times."""
        prompts = 1 if isinstance(self.body, ChatBody) else len(_prompts(self.body))
        return prompts * self.body.n

    def cancel(self) -> None:
        """Stop every generation of the call, submitted or still to be (from any thread)."""
        self.cancelled = True
        for choice in list(self.choices):
            choice.handle.cancel()

    def wait_stopped(self) -> None:
        """Block until `submit` has returned and every generation has finished (a cancelled
        one finishes at the scheduler's next step): only then is the call's work over."""
        self._submitted.wait()
        for choice in self.choices:
            with contextlib.suppress(Exception):  # failed is stopped too: its error went elsewhere
                choice.handle.wait()

    def after_stopped(self, then: Callable[[], None]) -> None:
        """Run `then` once the call's work is over, without blocking the caller (the event loop)."""
        if self._submitted.is_set() and all(c.handle.finish_reason is not None for c in self.choices):
            then()
            return

        def wait_then() -> None:
            self.wait_stopped()
            then()

        threading.Thread(target=wait_then, name="plait-call-release", daemon=True).start()

    def wait(self) -> None:
        deadline = time.monotonic() + self.runtime.config.request_timeout
        try:
            for choice in self.choices:
                choice.handle.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.cancel()  # the caller waits for the cancelled generations to stop
            raise ApiError(
                504,
                f"generation did not finish within {self.runtime.config.request_timeout:g} s",
                "timeout_error",
                "request_timeout",
            ) from None

    # ---- answers -------------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        if self.kind == "chat":
            choices = [
                {
                    "index": c.index,
                    "message": c.message(),
                    "finish_reason": c.finish(),
                    "logprobs": None,
                }
                for c in self.choices
            ]
            obj = "chat.completion"
        else:
            choices = [
                {
                    "index": c.index,
                    "text": c.handle.text,
                    "finish_reason": _finish(c.handle),
                    "logprobs": None,
                }
                for c in self.choices
            ]
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model.id,
            "choices": choices,
            "usage": _usage(self.choices),
            "plait": _plait_usage(self.choices),
        }

    def chunk(
        self,
        delta: str | None = None,
        finish: str | None = None,
        *,
        role: bool = False,
        usage: bool = False,
        reasoning: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if usage:
            return {
                "id": self.id,
                "object": self._chunk_object(),
                "created": self.created,
                "model": self.model.id,
                "choices": [],
                "usage": _usage(self.choices),
            }
        if self.kind == "chat":
            content: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                content["content"] = delta
            if reasoning is not None:
                content["reasoning_content"] = reasoning
            if tool_calls:
                content["tool_calls"] = tool_calls
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {
            "id": self.id,
            "object": self._chunk_object(),
            "created": self.created,
            "model": self.model.id,
            "choices": [choice],
        }

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    # ---- accounting ---------------------------------------------------------------------------
    def admit(self) -> None:
        """Take an admission slot; a refused call (503) is traced too: overload should be visible."""
        try:
            self.runtime.gate.enter(self.sequences)
        except ApiError as exc:
            self.record("rejected", exc.message)
            raise

    def record(self, status: str, error: str | None = None) -> None:
        runtime = self.runtime
        usage = _usage(self.choices) if self.choices else {"prompt_tokens": 0, "completion_tokens": 0}
        runtime.metrics.count_tokens(self.model.id, usage["prompt_tokens"], usage["completion_tokens"])
        inputs: dict[str, Any] = {
            "model": self.model.id,
            **self.body.model_dump(exclude_unset=True, exclude={"model"}),
        }
        outputs = None
        if status == "ok":
            outputs = {
                "texts": [c.handle.text for c in self.choices],
                "finish_reasons": [c.finish() for c in self.choices],
            }
        runtime.traces.submit(
            Trace(
                self.target,
                self.id,
                inputs,
                outputs,
                status,
                (time.perf_counter() - self.started) * 1000,
                usage["prompt_tokens"],
                usage["completion_tokens"],
                error,
            )
        )


async def _answer(runtime: ServeRuntime, call: _Call, request: Request) -> JSONResponse:
    def work() -> dict[str, Any]:
        try:
            call.submit(stream=False)
            call.wait()
            call.record("cancelled" if call.cancelled else "ok")
            return call.response()
        except BaseException as exc:
            call.record("error", str(exc))
            raise
        finally:  # the slot is held until the engine has stopped every generation of the call
            call.cancel()
            call.wait_stopped()
            runtime.gate.leave(call.sequences)

    call.admit()
    answer = runtime.pool.run(work, runtime.config.request_timeout + _GRACE)
    try:
        return JSONResponse(await unless_client_leaves(request, answer, on_leave=call.cancel))
    except Exception as exc:  # answered here: an unhandled error would also be logged as a crash
        raise api_error_for(exc) from None


async def _stream(runtime: ServeRuntime, call: _Call) -> StreamingResponse:
    if call.sequences != 1:
        raise ApiError(400, "streaming answers one prompt with n=1", code="unsupported_parameter")
    include_usage = bool((call.body.stream_options or {}).get("include_usage"))
    outcome = {"status": "cancelled", "error": None}

    def release() -> None:
        """Stop the generation; the slot and the trace wait until the engine has."""
        call.cancel()
        call.after_stopped(
            lambda: (runtime.gate.leave(call.sequences), call.record(outcome["status"], outcome["error"]))
        )

    call.admit()
    try:
        await runtime.pool.run(lambda: call.submit(stream=True), runtime.config.request_timeout)
    except BaseException as exc:
        outcome.update(status="error", error=str(exc))
        release()
        if isinstance(exc, Exception):
            raise api_error_for(exc) from None
        raise  # cancellation
    handle, turn = call.choices[0].handle, call.choices[0].turn
    splitter = turn.stream_splitter() if turn is not None else None

    held = [] if call.tools is not None and call.tools.calls else None  # an answer read at the end

    def chunks(thought: str, answer: str) -> list[dict[str, Any]]:
        """The chunks of one (reasoning, answer) pair: reasoning goes in `reasoning_content`; an
        answer that may call tools is held back."""
        if held is not None:
            held.append(answer)
            answer = ""
        return ([call.chunk(reasoning=thought)] if thought else []) + ([call.chunk(answer)] if answer else [])

    def tool_chunks() -> tuple[list[dict[str, Any]], str]:
        """The held answer as one chunk (its text and its calls, whole) and the finish reason."""
        parsed = call.tools.parse("".join(held))
        if not parsed.calls:
            return ([call.chunk(parsed.text)] if parsed.text else []), _finish(handle)
        calls = openai_tool_calls(parsed, indexed=True)
        return [call.chunk(parsed.text or None, tool_calls=calls)], "tool_calls"

    async def events() -> AsyncIterator[str]:
        try:
            if call.kind == "chat":
                yield sse(call.chunk(role=True))
            async for piece in iterate_in_thread(handle.deltas(), on_close=handle.cancel):
                for chunk in chunks(*(splitter.feed(piece) if splitter else ("", piece))) if piece else ():
                    yield sse(chunk)
            for chunk in chunks(*splitter.flush()) if splitter else ():
                yield sse(chunk)
            finish = _finish(handle)
            if held is not None:
                answer, finish = tool_chunks()
                for chunk in answer:
                    yield sse(chunk)
            yield sse(call.chunk(finish=finish))
            if include_usage:
                yield sse(call.chunk(usage=True))
            yield sse("[DONE]")
            outcome["status"] = "ok"
        except Exception as exc:  # the headers are sent: report the error in the stream
            error = api_error_for(exc)
            outcome.update(status="error", error=error.message)
            yield sse({"error": {"message": error.message, "type": error.type, "code": error.code}})
            yield sse("[DONE]")

    return StreamingResponse(
        GuardedStream(events(), release), media_type="text/event-stream", headers=SSE_HEADERS
    )


def make_router(runtime: ServeRuntime) -> APIRouter:
    router = APIRouter()

    async def complete(request: Request, kind: str, schema: type) -> Any:
        body = _parse(schema, await read_json(request))
        _refuse_unsupported(body)
        call = _Call(runtime, kind, body)
        return await (_stream(runtime, call) if body.stream else _answer(runtime, call, request))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, "chat", ChatBody)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, "completion", CompletionBody)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": m.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "plait",
                    "aliases": sorted(m.names - {m.id}),
                }
                for m in runtime.models.values()
            ],
        }

    return router

"""The remote engine: DSPy programs on any OpenAI-compatible server, over httpx.

    lm = plait.LM("http://gpu-box:8000/v1", model="nvidia/NVIDIA-Nemotron-Nano-9B-v2")
    dspy.configure(lm=lm, adapter=plait.ConstrainedAdapter())

This is how a program outgrows one machine: the same `dspy.LM` bridge as the local engine
(DSPy 3.4's engine protocol: `complete`, `stream`, an async twin, `dump_state`/`load_state`,
capability attributes), with every call sent to `POST {base_url}/chat/completions` on vLLM,
SGLang, NIM, or another `plait serve`.

Grammar constraints travel in the server's own structured-output parameters. A request's
grammar (`plait.backends.grammar.spec.attached_grammar`: what `ConstrainedAdapter`
attaches) is written in the server's **dialect**:

=============  ==============================================================================
dialect        how a JSON schema / regex / choice list / Lark grammar is sent
=============  ==============================================================================
plait          `plait_grammar` (the GrammarSpec itself, token budgets included: exact)
vllm           `structured_outputs: {json | regex | choice | grammar}` (vLLM >= 0.10.2)
vllm-legacy    `guided_json | guided_regex | guided_choice | guided_grammar` (older vLLM, NIM)
sglang         `response_format` json_schema, `regex`; choices as a regex; no Lark
openai         `response_format` json_schema only
=============  ==============================================================================

`auto` (the default) asks `GET {base_url}/models` once and reads `owned_by` (plait, vllm,
sglang); anything else is treated as plain OpenAI. Lark grammars from `ConstrainedAdapter`
use llguidance's Lark dialect: a vLLM server must run the `guidance` structured-output
backend to accept them. Token budgets for free-text fields are plait's own extension: other
servers bound free text by `max_tokens` alone.

The API key is never saved with a program: `dump_state` records the environment variable to
read it from (`PLAIT_API_KEY` by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any

import dspy
import httpx
from dspy.lm15 import (
    AuthError,
    ContextLengthError,
    InvalidRequestError,
    ProviderError,
    RateLimitError,
    Request,
    Response,
    ServerError,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    ThinkingDelta,
    TimeoutError,
    ToolCallDelta,
    ToolChoice,
    TransportError,
    UnsupportedFeatureError,
    Usage,
    response_from_openai_chat,
)

from plait.backends.clients.features import (
    refuse_text_completions,
    refuse_unsupported_settings,
    text_conversation,
)
from plait.backends.grammar.reasoning import ReasoningFormat, ReasoningRequest, switch_messages
from plait.backends.grammar.spec import EXTENSION_KEY, GrammarSpec, attached_grammar
from plait.backends.grammar.tool_formats import tool_specs
from plait.version import __version__

log = logging.getLogger(__name__)

DIALECTS = ("auto", "plait", "vllm", "vllm-legacy", "sglang", "openai")
DEFAULT_API_KEY_ENV = "PLAIT_API_KEY"
_PROVIDER = "openai-compatible"
#: Config extensions that are DSPy/plait bookkeeping, never sent to the server as-is.
_PRIVATE_EXTENSIONS = frozenset({"metadata", EXTENSION_KEY})
_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_call",
    "function_call": "tool_call",
    "content_filter": "content_filter",
}


# ---- structured outputs -------------------------------------------------------------------------


def _json_format(schema: Any) -> dict[str, Any]:
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }
    }


def _choices_regex(choices: Iterable[str]) -> str:
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def structured_output_params(spec: GrammarSpec, dialect: str) -> dict[str, Any]:
    """Request-body fields that ask a `dialect` server to decode under `spec` (a GrammarSpec).

    Raises `UnsupportedFeatureError` when the server's dialect cannot express the grammar.
    """
    kind, source = spec.kind, spec.source
    if dialect == "plait":
        return {EXTENSION_KEY: spec.to_json()}
    if spec.budgets:
        log.debug("token budgets are a plait extension: a %s server bounds text by max_tokens", dialect)
    if kind == "json_schema":
        return _json_format(source)
    choices = list(source) if kind == "choices" else None
    if dialect == "vllm":
        key = {"regex": "regex", "choices": "choice", "lark": "grammar"}[kind]
        return {"structured_outputs": {key: choices if choices is not None else source}}
    if dialect == "vllm-legacy":
        key = {"regex": "guided_regex", "choices": "guided_choice", "lark": "guided_grammar"}[kind]
        return {key: choices if choices is not None else source}
    if dialect == "sglang" and kind in ("regex", "choices"):
        return {"regex": _choices_regex(choices) if choices is not None else source}
    raise UnsupportedFeatureError(
        f"a {dialect} server cannot decode under a {kind} grammar (it takes JSON schemas"
        f"{' and regexes' if dialect == 'sglang' else ''}); choose its dialect explicitly "
        "(plait, vllm, vllm-legacy, sglang) or use a JSON-mode adapter",
        provider=_PROVIDER,
    )


# ---- the request body ---------------------------------------------------------------------------


def tool_params(tools: Iterable[Any], choice: ToolChoice | None) -> dict[str, Any]:
    """`tools`, `tool_choice` and `parallel_tool_calls` in OpenAI's form. Tools `choice` does
    not allow are left out; one required tool is named the way OpenAI names a forced call."""
    specs = tool_specs(tools)
    if choice is None:
        return {"tools": [s.openai() for s in specs]}
    if choice.allowed:
        specs = [s for s in specs if s.name in choice.allowed]
    mode: Any = choice.mode
    if mode == "required" and len(choice.allowed) == 1:
        mode = {"type": "function", "function": {"name": choice.allowed[0]}}
    params = {"tools": [s.openai() for s in specs], "tool_choice": mode}
    if choice.parallel is not None:
        params["parallel_tool_calls"] = choice.parallel
    return params


def _openai_response_format(fmt: Mapping[str, Any]) -> dict[str, Any]:
    """DSPy's canonical `response_format` in OpenAI's wire shape."""
    if fmt.get("type") == "json_schema" and "json_schema" not in fmt:
        inner = {"name": fmt.get("name") or "output", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            inner["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": inner}
    return dict(fmt)


# ---- errors -------------------------------------------------------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def http_error(response: httpx.Response, body: bytes) -> ProviderError:
    """The DSPy (lm15) error for a non-2xx answer: 429/5xx are retried by DSPy, 4xx are not."""
    message, code = body.decode("utf-8", "replace")[:2000], None
    try:
        error = json.loads(body).get("error")
        if isinstance(error, Mapping):
            message, code = str(error.get("message") or message), error.get("code")
        elif isinstance(error, str):
            message = error
    except (ValueError, AttributeError):
        pass
    status = response.status_code
    meta: dict[str, Any] = {
        "provider": _PROVIDER,
        "status": status,
        "retry_after": _retry_after(response),
        "provider_code": str(code) if code is not None else None,
    }
    text = f"{response.request.url} answered {status}: {message}"
    if status in (401, 403):
        return AuthError(text, env_keys=(DEFAULT_API_KEY_ENV,), **meta)
    if status == 429:
        return RateLimitError(text, **meta)
    if status in (408, 504):
        return TimeoutError(text, **meta)
    if code in ("context_length_exceeded", "context_length"):
        return ContextLengthError(text, **meta)
    if 400 <= status < 500:
        return InvalidRequestError(text, **meta)
    if status >= 500:
        return ServerError(text, **meta)
    return ProviderError(text, **meta)


def _transport_error(exc: httpx.HTTPError, url: str) -> Exception:
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"{url}: timed out ({type(exc).__name__})", provider=_PROVIDER)
    return TransportError(f"{url}: {type(exc).__name__}: {exc}", provider=_PROVIDER)


# ---- streaming ----------------------------------------------------------------------------------


class _StreamState:
    """Turns OpenAI chat chunks into lm15 stream events."""

    def __init__(self, model: str):
        self.model = model
        self.started = False
        self.finish: str | None = None
        self.usage: Usage | None = None

    def events(self, line: str) -> list[Any]:
        if not line.startswith("data:"):
            return []
        data = line[5:].strip()
        if not data or data == "[DONE]":
            return []
        chunk = json.loads(data)
        if isinstance(chunk.get("error"), Mapping):  # an error after the headers were sent
            error = chunk["error"]
            raise ServerError(
                f"the server failed mid-stream: {error.get('message')}",
                provider=_PROVIDER,
                provider_code=str(error.get("code")),
            )
        out: list[Any] = []
        if not self.started:
            self.started = True
            out.append(StreamStartEvent(id=chunk.get("id") or None, model=chunk.get("model") or self.model))
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out.append(StreamDeltaEvent(ThinkingDelta(delta["reasoning_content"])))
            if delta.get("content"):
                out.append(StreamDeltaEvent(TextDelta(delta["content"])))
            for call in delta.get("tool_calls") or ():  # a call's id and name come with its first piece
                function = call.get("function") or {}
                out.append(
                    StreamDeltaEvent(
                        ToolCallDelta(
                            function.get("arguments") or "",
                            part_index=call.get("index", 0),
                            id=call.get("id"),
                            name=function.get("name"),
                        )
                    )
                )
            if choice.get("finish_reason"):
                self.finish = _FINISH.get(choice["finish_reason"], "stop")
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.usage = Usage(
                input_tokens=usage.get("prompt_tokens"), output_tokens=usage.get("completion_tokens")
            )
        return out

    def end(self) -> list[Any]:
        out = [] if self.started else [StreamStartEvent(id=None, model=self.model)]
        out.append(StreamEndEvent(finish_reason=self.finish or "stop", usage=self.usage))
        return out


# ---- the engines --------------------------------------------------------------------------------


#: The request field each server reads a thinking budget from (NIM's name for the others;
#: `plait serve` reads both).
_BUDGET_FIELDS = {"vllm": "thinking_token_budget"}
_DEFAULT_BUDGET_FIELD = "max_thinking_tokens"


def reasoning_params(
    wanted: ReasoningRequest, dialect: str, switch: str, messages: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(extra body fields, messages) that ask a server for `wanted` thinking.

    `plait serve` reads the template's switch itself: it gets `reasoning_effort` on/off and a
    budget. Other servers get the switch of the served model's template (`switch`): "kwarg"
    sends `chat_template_kwargs.enable_thinking` (Nemotron 3 on vLLM, SGLang or NIM), "flag"
    appends `/think` or `/no_think` to the system message (Nano-9B-v2); a budget goes in the
    server's own field (`_BUDGET_FIELDS`)."""
    if wanted.mode == "default":
        return {}, messages
    budget_field = _BUDGET_FIELDS.get(dialect, _DEFAULT_BUDGET_FIELD)
    extra: dict[str, Any] = {} if wanted.budget is None else {budget_field: wanted.budget}
    if dialect == "plait":
        return extra | {"reasoning_effort": wanted.mode}, messages
    messages, template_kwargs = switch_messages(ReasoningFormat(switch), wanted, messages)
    return (extra | {"chat_template_kwargs": template_kwargs} if template_kwargs else extra), messages


class RemoteEngine:
    """Synchronous DSPy engine over an OpenAI-compatible server's chat completions."""

    supports_function_calling = True  # tools go in OpenAI's form; the server parses the calls
    supports_response_schema = True
    supported_params = frozenset(
        {
            "temperature",
            "max_tokens",
            "top_p",
            "top_k",
            "stop",
            "seed",
            "n",
            "response_format",
            "frequency_penalty",
            "presence_penalty",
        }
    )

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = DEFAULT_API_KEY_ENV,
        dialect: str = "auto",
        timeout: float = 300.0,
        max_connections: int = 64,
        reasoning: Any = None,
        reasoning_switch: str = "kwarg",
    ):
        """`reasoning`: the thinking default of every call (see `plait.LM`); `reasoning_switch`:
        how the served model's template turns thinking on and off ("kwarg" or "flag", see
        `reasoning_params`)."""
        if reasoning_switch not in ("kwarg", "flag"):
            raise ValueError(f"reasoning_switch must be 'kwarg' or 'flag', not {reasoning_switch!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, not {base_url!r}")
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}, not {dialect!r}")
        if not model:
            raise ValueError("model is required: the model name the server serves")
        self.base_url = base_url.rstrip("/")
        self.model, self.dialect_setting, self.timeout = model, dialect, float(timeout)
        self.api_key_env, self.max_connections = api_key_env, max_connections
        self.reasoning, self.reasoning_switch = ReasoningRequest.parse(reasoning), reasoning_switch
        self._api_key = (
            api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        )
        self._dialect: str | None = None if dialect == "auto" else dialect
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None

    @property
    def supports_reasoning(self) -> bool:
        """Whether DSPy should ask for native reasoning: `plait serve` knows its model's
        thinking format; another server is taken at its word when a reasoning setting is given."""
        return self.reasoning.mode != "default" or self.dialect == "plait"

    # ---- connection --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"plait-remote/{__version__}"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def client_options(self) -> dict[str, Any]:
        limits = httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_connections
        )
        return {
            "headers": self.headers(),
            "timeout": httpx.Timeout(self.timeout, connect=10.0),
            "limits": limits,
        }

    @property
    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(**self.client_options())
            return self._client

    @property
    def dialect(self) -> str:
        """The structured-output dialect; `auto` asks the server once it answers. While it
        cannot be reached, calls go out as plain OpenAI (and fail to connect); the question
        is asked again on the next call, so a server that comes back is read right."""
        if self._dialect is None:
            detected = self._detect_dialect()
            if detected is None:
                return "openai"
            with self._lock:
                self._dialect = self._dialect or detected
        return self._dialect

    def _detect_dialect(self) -> str | None:
        """The dialect from the server's `/models`, or None when the server cannot be reached."""
        try:
            response = self.client.get(f"{self.base_url}/models", timeout=10.0)
            models = response.json().get("data") if response.status_code == 200 else None
        except httpx.TransportError:
            return None
        except (httpx.HTTPError, ValueError, AttributeError):
            models = None
        return dialect_from_models(models, self.model)

    @property
    def accepts_grammar(self) -> bool:
        """Whether `ConstrainedAdapter` may send grammars: every dialect but plain OpenAI's."""
        return self.dialect != "openai"

    # ---- requests ----------------------------------------------------------------------------
    def body(self, request: Request, *, stream: bool = False) -> dict[str, Any]:
        """The chat-completions body for a DSPy request. `plait serve` runs plait's engine, so
        what that engine does not do is refused here (it would ignore it); another server
        gets every setting and decides."""
        config, dialect = request.config, self.dialect
        if dialect == "plait":
            refuse_unsupported_settings(request)
        wanted = self.reasoning.merged(ReasoningRequest.from_dspy(config.reasoning))
        thinking, messages = reasoning_params(
            wanted, dialect, self.reasoning_switch, text_conversation(request)
        )
        body: dict[str, Any] = {"model": self.model, "messages": messages, **thinking}
        for key in (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(config, key, None)
            if value is not None:
                body[key] = value
        if config.stop:
            body["stop"] = list(config.stop)
        if config.logprobs is not None:  # lm15's count of alternatives: 0 = the chosen tokens only
            body["logprobs"] = True
            if config.logprobs:
                body["top_logprobs"] = config.logprobs
        if request.tools:
            body |= tool_params(request.tools, config.tool_choice)
        for key, value in (config.extensions or {}).items():
            if key not in _PRIVATE_EXTENSIONS:
                body[key] = value
        spec = attached_grammar(request)
        if spec is not None:
            body.pop("response_format", None)
            body.update(structured_output_params(spec, dialect))
        elif config.response_format:
            body["response_format"] = _openai_response_format(config.response_format)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def complete(self, request: Request) -> Response:
        body = self.body(request)
        try:
            response = self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        return self._response(request, response, response.content)

    def stream(self, request: Request) -> Iterator[Any]:
        body = self.body(request, stream=True)
        state = _StreamState(request.model)
        try:
            with self.client.stream("POST", self.url, json=body) as response:
                if response.status_code >= 400:
                    raise http_error(response, response.read())
                for line in response.iter_lines():
                    yield from state.events(line)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        yield from state.end()

    def _response(self, request: Request, response: httpx.Response, content: bytes) -> Response:
        if response.status_code >= 400:
            raise http_error(response, content)
        try:
            payload = json.loads(content)
            return response_from_openai_chat(payload, model=request.model)
        except (ValueError, TypeError, KeyError) as exc:
            raise ServerError(
                f"{self.url} answered something that is not a chat completion: {exc}", provider=_PROVIDER
            ) from exc

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # ---- saving (no secrets: the key is read from api_key_env when loaded) -------------------
    def dump_state(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "dialect": self.dialect_setting,
            "timeout": self.timeout,
            "api_key_env": self.api_key_env,
            "max_connections": self.max_connections,
            "reasoning": self.reasoning.setting(),
            "reasoning_switch": self.reasoning_switch,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> RemoteEngine:
        return cls(**state)


class AsyncRemoteEngine:
    """The async twin: one `httpx.AsyncClient` per event loop (a client cannot cross loops)."""

    def __init__(self, sync: RemoteEngine):
        self.sync = sync
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = httpx.AsyncClient(**self.sync.client_options())
        return client

    async def _body(self, request: Request, stream: bool = False) -> dict[str, Any]:
        if self.sync._dialect is None:  # detection is a blocking call: off the loop
            return await asyncio.to_thread(self.sync.body, request, stream=stream)
        return self.sync.body(request, stream=stream)

    async def complete(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            response = await self._client().post(self.sync.url, json=body)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.sync.url) from exc
        return self.sync._response(request, response, response.content)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        body = await self._body(request, stream=True)
        state = _StreamState(request.model)
        try:
            async with self._client().stream("POST", self.sync.url, json=body) as response:
                if response.status_code >= 400:
                    raise http_error(response, await response.aread())
                async for line in response.aiter_lines():
                    for event in state.events(line):
                        yield event
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.sync.url) from exc
        for event in state.end():
            yield event

    async def aclose(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncRemoteEngine:
        return cls(RemoteEngine.load_state(state))


def dialect_from_models(models: Any, model: str) -> str:
    """The dialect from a `/models` listing: the served model's `owned_by`, else any entry's."""
    known = {"plait": "plait", "vllm": "vllm", "sglang": "sglang"}
    if not isinstance(models, list):
        return "openai"
    entries = [m for m in models if isinstance(m, Mapping)]
    ours = [m for m in entries if m.get("id") == model or model in (m.get("aliases") or ())]
    for entry in ours + entries:
        owner = str(entry.get("owned_by") or "").lower()
        if owner in known:
            return known[owner]
    return "openai"


def remote_lm(
    base_url: str,
    model: str,
    *,
    api_key: str | None = None,
    api_key_env: str | None = DEFAULT_API_KEY_ENV,
    dialect: str = "auto",
    timeout: float = 300.0,
    max_connections: int = 64,
    reasoning: Any = None,
    reasoning_switch: str = "kwarg",
    **defaults: Any,
) -> dspy.LM:
    """A `dspy.LM` whose calls go to the OpenAI-compatible server at `base_url` (".../v1").

    `model` is the name the server serves. `api_key` (else the `api_key_env` environment
    variable) is sent as a bearer token. `defaults` are DSPy's LM settings (temperature,
    max_tokens, cache, num_retries, ...); transient failures (429, 5xx, connection errors)
    are retried by DSPy, 3 times unless `num_retries` says otherwise. `reasoning` and
    `reasoning_switch`: the thinking of the served model (see `RemoteEngine`).
    """
    engine = RemoteEngine(
        base_url,
        model,
        api_key=api_key,
        api_key_env=api_key_env,
        dialect=dialect,
        timeout=timeout,
        max_connections=max_connections,
        reasoning=reasoning,
        reasoning_switch=reasoning_switch,
    )
    refuse_text_completions(defaults)
    defaults.setdefault("num_retries", 3)
    return dspy.LM(
        f"remote/{model}{engine.reasoning.model_suffix()}",
        engine=engine,
        async_engine=AsyncRemoteEngine(engine),
        **defaults,
    )


__all__ = [
    "AsyncRemoteEngine",
    "RemoteEngine",
    "dialect_from_models",
    "remote_lm",
    "structured_output_params",
]

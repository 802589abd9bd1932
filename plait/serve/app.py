"""The HTTP application: compiled programs, OpenAI-compatible engine endpoints, health, metrics.

    POST /v1/programs/{name}[?stream=true]   inputs -> outputs (SSE field streaming)
    GET  /v1/programs[/{name}]               what is served: inputs, outputs, model, hashes
    POST /v1/chat/completions, /v1/completions, GET /v1/models   (plait.serve.openai)
    GET  /healthz                            liveness (no auth)
    GET  /metrics                            Prometheus text

Requests pass, outermost first: metrics (counts everything, rejections too) -> bearer auth ->
rate limit -> body-size limit -> routing. Errors are JSON in OpenAI's shape
(`plait.serve.errors`); no request can crash the server or wait forever: a full server
answers 503, an unfinished call 504.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from plait.http_guard import BearerAuth, BodySizeLimit
from plait.serve.bridge import CLIENT_CLOSED, ScopedRun, client_closed, unless_client_leaves
from plait.serve.errors import ApiError, api_error_for, error_response, guard_error, read_json
from plait.serve.limits import RateLimit, RateLimiter
from plait.serve.metrics import MetricsMiddleware
from plait.serve.openai import make_router
from plait.serve.programs import CallResult, ServedProgram
from plait.serve.runtime import ServeRuntime
from plait.serve.sse import SSE_HEADERS, GuardedStream, sse
from plait.serve.tracing import Trace
from plait.version import __version__

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _usage(result: CallResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class _ProgramCall:
    """Accounting for one program call: metrics and the trace, written once it is over."""

    def __init__(self, runtime: ServeRuntime, program: ServedProgram, inputs: dict[str, Any]):
        self.runtime, self.program, self.inputs = runtime, program, inputs
        self.id = "prog-" + uuid.uuid4().hex[:24]
        self.started = time.perf_counter()

    def succeeded(self, result: CallResult) -> dict[str, Any]:
        metrics = self.runtime.metrics
        metrics.program_calls.inc(program=self.program.name, outcome="ok")
        metrics.program_latency.observe(result.seconds, program=self.program.name)
        metrics.count_tokens(self.program.model, result.prompt_tokens, result.completion_tokens)
        latency_ms = (time.perf_counter() - self.started) * 1000
        self.runtime.traces.submit(
            Trace(
                self.program.name,
                self.id,
                self.inputs,
                result.outputs,
                "ok",
                latency_ms,
                result.prompt_tokens,
                result.completion_tokens,
            )
        )
        return {
            "id": self.id,
            "program": self.program.name,
            "model": self.program.model,
            "outputs": result.outputs,
            "usage": _usage(result),
            "latency_ms": round(latency_ms, 3),
        }

    def failed(self, exc: BaseException) -> ApiError:
        error = api_error_for(exc)
        if error.status >= 500 and error.code == "internal_error":
            log.error("program %s failed: %s: %s", self.program.name, type(exc).__name__, exc)
            error = ApiError(500, f"the program failed: {error.message}", "server_error", "program_error")
        status = "cancelled" if error.code == CLIENT_CLOSED else str(error.status)
        self.runtime.metrics.program_calls.inc(program=self.program.name, outcome=status)
        self.runtime.traces.submit(
            Trace(
                self.program.name,
                self.id,
                self.inputs,
                None,
                status,
                (time.perf_counter() - self.started) * 1000,
                error=error.message,
            )
        )
        return error


async def _call_program(runtime: ServeRuntime, call: _ProgramCall, request: Request) -> JSONResponse:
    run = _admit(runtime, call)
    answer = runtime.pool.run(lambda: run(call.program.call, call.inputs), runtime.config.request_timeout)
    try:
        result = await unless_client_leaves(request, answer, on_leave=run.cancel)
    except Exception as exc:
        run.cancel()  # after a timeout (504) too: its LM calls are cancelled, and the program ends
        raise call.failed(exc) from None
    return JSONResponse(call.succeeded(result))


def _admit(runtime: ServeRuntime, call: _ProgramCall) -> ScopedRun:
    """Take an admission slot, held by the call's run until its work is over; a refused call
    (503) is traced too: overload should be visible."""
    try:
        runtime.gate.enter()
    except ApiError as exc:
        raise call.failed(exc) from None
    return ScopedRun(release=runtime.gate.leave)


def _stream_program(runtime: ServeRuntime, call: _ProgramCall) -> StreamingResponse:
    run = _admit(runtime, call)
    answered = False  # a prediction or an error was sent: the call is accounted for

    async def events() -> AsyncIterator[str]:
        nonlocal answered
        try:
            async for event, data in call.program.stream(call.inputs, run):
                if event == "prediction":
                    answered = True
                    yield sse(call.succeeded(data), "prediction")
                else:
                    yield sse(data, event)
        except Exception as exc:  # headers are sent: the error is the stream's last event
            answered = True
            error = call.failed(exc)
            yield sse({"error": {"message": error.message, "type": error.type, "code": error.code}}, "error")
        yield sse("[DONE]", "done")

    def release() -> None:
        """The stream is over or dropped: stop the program (its run frees the slot once it has)."""
        run.cancel()
        if not answered:
            call.failed(client_closed())

    return StreamingResponse(
        GuardedStream(events(), release), media_type="text/event-stream", headers=SSE_HEADERS
    )


def create_app(runtime: ServeRuntime) -> FastAPI:
    """The ASGI app over a built `ServeRuntime` (programs and models already loaded)."""
    config = runtime.config
    app = FastAPI(title="plait", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = runtime

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(
            422, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error", "invalid_request"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        error = api_error_for(exc)
        if error.status >= 500:
            log.exception("unexpected error", exc_info=exc)
        return error.response()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "version": __version__,
            "programs": sorted(runtime.programs),
            "models": sorted(runtime.models),
            "inflight": runtime.gate.inflight,
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(runtime.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/programs")
    async def list_programs() -> dict[str, Any]:
        return {"object": "list", "data": [p.describe() for p in runtime.programs.values()]}

    @app.get("/v1/programs/{name}")
    async def describe_program(name: str) -> dict[str, Any]:
        return runtime.program(name).describe()

    @app.post("/v1/programs/{name}")
    async def call_program(name: str, request: Request, stream: bool = False) -> Any:
        program = runtime.program(name)
        inputs = program.validate(await read_json(request))
        call = _ProgramCall(runtime, program, inputs)
        if stream:
            return _stream_program(runtime, call)
        return await _call_program(runtime, call, request)

    app.include_router(make_router(runtime))

    # added innermost first: the last one added sees each request first
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes, error=guard_error)
    limiter = RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit > 0 else None
    app.add_middleware(RateLimit, limiter=limiter)
    app.add_middleware(BearerAuth, keys=config.api_keys, error=guard_error)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    return app

"""HTTP errors of the server, and how plait's typed exceptions map onto status codes.

Every error the server sends has one JSON shape, OpenAI's, so an OpenAI client library (and
plait's own remote engine) can read any of them:

    {"error": {"message": "...", "type": "invalid_request_error", "code": "context_length"}}

The mapping is the contract with clients: 4xx means "change the request", 429/503 mean
"retry later" (with a `Retry-After` header), 500 is a bug or a program that failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from plait.errors import (
    ContextLengthError,
    EngineClosedError,
    EngineOverloadedError,
    MemoryBudgetError,
    ModelNotFoundError,
    PlaitError,
)


@dataclass
class ApiError(Exception):
    """An error answered as JSON with `status`; raised anywhere in a request's handling."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.headers)


def error_response(
    status: int, message: str, type_: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_GUARD_ERRORS = {
    401: ("authentication_error", "invalid_api_key"),
    413: ("invalid_request_error", "request_too_large"),
}


def guard_error(status: int, message: str, headers: dict[str, str]) -> JSONResponse:
    """The OpenAI-style error body for what `plait.http_guard`'s middleware refuses."""
    type_, code = _GUARD_ERRORS.get(status, ("invalid_request_error", None))
    return error_response(status, message, type_, code, headers or None)


def _grammar_error() -> type[PlaitError] | None:
    """The constrained-decoding error type, when that part of plait is installed."""
    try:
        from plait.backends.grammar.spec import GrammarError
    except ImportError:
        return None
    return GrammarError


def find_plait_error(exc: BaseException) -> PlaitError | None:
    """The `PlaitError` behind `exc`: DSPy wraps engine failures in its own LM errors, so the
    cause chain is walked (bounded, and cycle-safe)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        if isinstance(current, PlaitError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def api_error_for(exc: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    error = find_plait_error(exc)
    if error is None:
        return ApiError(500, f"{type(exc).__name__}: {exc}", "server_error", "internal_error")
    message = str(error)
    if isinstance(error, EngineOverloadedError):
        return ApiError(503, message, "overloaded_error", "engine_overloaded", {"Retry-After": "1"})
    if isinstance(error, EngineClosedError):
        return ApiError(503, message, "overloaded_error", "engine_closed", {"Retry-After": "5"})
    if isinstance(error, ContextLengthError):
        return ApiError(400, message, "invalid_request_error", "context_length_exceeded")
    if isinstance(error, MemoryBudgetError):
        return ApiError(400, message, "invalid_request_error", "memory_budget_exceeded")
    if isinstance(error, ModelNotFoundError):
        return ApiError(404, message, "not_found_error", "model_not_found")
    grammar_error = _grammar_error()
    if grammar_error is not None and isinstance(error, grammar_error):
        return ApiError(400, message, "invalid_request_error", "invalid_grammar")
    return ApiError(400, message, "invalid_request_error", type(error).__name__)


#: Deepest nesting of arrays and objects a request body may have. Real requests nest a few
#: levels (a JSON schema in `response_format`, a few dozen); a body thousands of levels deep
#: would overflow the stack of whatever walks it next (validation, grammars, traces).
MAX_JSON_DEPTH = 64

#: Where a lone UTF-16 surrogate may hide in a body: a `\uD800`-`\uDFFF` escape, or the
#: UTF-8-style bytes of one (which Python's JSON decoder lets through).
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


async def read_json(request: Request) -> Any:
    """The request body as JSON, or 400: malformed JSON, nesting deeper than `MAX_JSON_DEPTH`
    and lone surrogates (`"\\ud800"`: valid JSON, but not text, so no tokenizer or UTF-8
    encoder takes it) are the client's error, not a 500 from deep inside the server."""
    raw = await request.body()
    try:
        value = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="malformed_json") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise _too_deep()
    if _MAYBE_SURROGATE.search(raw) and _has_lone_surrogate(value):
        raise ApiError(
            400,
            'the body contains a lone UTF-16 surrogate (such as "\\ud800"), which is not text',
            code="invalid_unicode",
        )
    return value


def _too_deep() -> ApiError:
    return ApiError(
        400, f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
    )


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests lists and dicts more than `limit` levels (level by level, no
    recursion: the value may be as deep as the parser allowed)."""
    level = [value]
    for _ in range(limit):
        children: list[Any] = []
        for item in level:
            members = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            children.extend(m for m in members if isinstance(m, (dict, list)))
        if not children:
            return False
        level = children
    return True


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in `value` (keys included) holds an unpaired surrogate (escaped
    pairs were already joined by the decoder: what is left cannot be encoded as UTF-8)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False

"""Guard rails of plait's HTTP servers (`plait serve`, `plait index serve`), as ASGI middleware
so they act before a body is read.

- `BearerAuth`: 401 unless the request carries `Authorization: Bearer <key>` with one of the
  keys (compared in constant time); the health probe stays public for load balancers, and
  everything else (including `/metrics`, which reveals traffic) is private.
- `BodySizeLimit`: 413 when `Content-Length` declares too large a body, or when a chunked body
  grows past the limit while it is read; nothing larger than the limit is ever buffered.
- `is_loopback`: the one rule no server relaxes — off loopback, a key is required.

Each middleware takes its server's error-response factory, so each server keeps its own JSON
error body. This module sits at the bottom of the package: both servers import it.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths anyone may call.
PUBLIC_PATHS = frozenset({"/healthz"})

#: Builds an error response from (status, message, extra headers).
ErrorFactory = Callable[[int, str, dict[str, str]], Response]


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if there is one."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerAuth:
    """Answer 401 unless the request carries one of `keys` (no keys: everything passes)."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], error: ErrorFactory):
        self.app, self.error = app, error
        self.keys = [key.encode() for key in keys]

    def allowed(self, token: str | None) -> bool:
        if not self.keys:
            return True
        if token is None:
            return False
        given = token.encode()
        # every key is compared (no early exit), so timing does not tell which one matched
        return sum(hmac.compare_digest(given, key) for key in self.keys) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = bearer_token(scope) if scope["type"] == "http" else None
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self.allowed(token):
            await self.app(scope, receive, send)
            return
        problem = "missing bearer token" if token is None else "invalid API key"
        response = self.error(
            401, f"{problem}: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413; smaller ones are buffered and replayed."""

    def __init__(self, app: ASGIApp, max_bytes: int, error: ErrorFactory):
        self.app, self.max_bytes, self.error = app, max_bytes, error

    def _too_large(self, size: int | None = None) -> Response:
        got = f" ({size} bytes)" if size is not None else ""
        return self.error(413, f"request body too large{got}: the limit is {self.max_bytes} bytes", {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared == -1:
            await self.error(400, "invalid Content-Length header", {})(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await self._too_large(declared)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body size, None when not declared, -1 when unreadable."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return -1
            return length if length >= 0 else -1
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname may resolve to anything: treated as public

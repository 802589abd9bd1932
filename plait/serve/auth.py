"""Bearer-token authentication, as ASGI middleware so it runs before a body is read.

Every path except the health probe needs `Authorization: Bearer <key>` when keys are set:
load balancers probe `/healthz` without credentials, everything else (including `/metrics`,
which reveals traffic) is private. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from plait.serve.errors import error_response

#: Paths anyone may call.
PUBLIC_PATHS = frozenset({"/healthz"})


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

    def __init__(self, app: ASGIApp, keys: Iterable[str] = ()):
        self.app = app
        self.keys = [key.encode() for key in keys]

    def allowed(self, token: str | None) -> bool:
        if not self.keys:
            return True
        if token is None:
            return False
        given = token.encode()
        # compare against every key (no early exit) so timing says nothing about which matched
        return sum(hmac.compare_digest(given, key) for key in self.keys) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self.allowed(bearer_token(scope)):
            await self.app(scope, receive, send)
            return
        message = "missing bearer token" if bearer_token(scope) is None else "invalid API key"
        response = error_response(
            401,
            f"{message}: send 'Authorization: Bearer <key>'",
            "authentication_error",
            "invalid_api_key",
            {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

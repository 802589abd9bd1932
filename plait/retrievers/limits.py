"""Bounds on what a request may ask of the retrieval stack, and how the index server is exposed.

Plain Python (no torch, no web framework), so the CLI's argument parser can use them and the
server's settings are checked before anything heavy is imported or an index is opened.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.http_guard import is_loopback
from plait.retrievers.errors import SettingsError

#: Most results one query may ask for.
MAX_K = 1000

#: Where the index server's key comes from without --api-key; not `plait serve`'s PLAIT_API_KEY,
#: so a key handed to retrieval clients does not also open the LM endpoints.
API_KEY_ENV = "PLAIT_INDEX_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """How the index server is exposed and what one request may send.

    Attributes:
        api_keys: accepted bearer tokens; empty means no authentication (loopback only).
        max_body_bytes: largest request body; a larger one gets 413 before it is read in full.
        max_query_chars: longest query; a longer one gets 400 before any work is done.
    """

    host: str = "127.0.0.1"
    port: int = 8893
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024
    max_query_chars: int = 4096

    def check(self) -> ServerSettings:
        """Raise `SettingsError` for settings that cannot work or are unsafe; return self."""
        if not is_loopback(self.host) and not self.api_keys:
            raise SettingsError(
                f"refusing to serve the index on {self.host} without authentication: pass --api-key KEY "
                f"(or set {API_KEY_ENV}), or bind to 127.0.0.1"
            )
        if any(not key or key.strip() != key for key in self.api_keys):
            raise SettingsError("an API key must be non-empty and have no surrounding whitespace")
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"port must be in 1..65535, got {self.port}")
        for name in ("max_body_bytes", "max_query_chars"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self

"""What `plait serve` is told on its command line, checked before anything is loaded.

The one rule that cannot be relaxed: a server reachable from other machines must require a
bearer token. Binding to a non-loopback address without `--api-key` refuses to start, because
the endpoints run arbitrary prompts on the host's CPU/GPU and write to its database.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.errors import PlaitError
from plait.http_guard import is_loopback

#: How a served program's predictors format prompts (`plait serve --adapter`): "auto" takes the
#: compiled artifact's own adapter, else plait's constrained one.
ADAPTERS = ("auto", "constrained", "chat", "json")


class ServeConfigError(PlaitError):
    """A `plait serve` setting that cannot work (the CLI prints it and exits 2)."""


@dataclass(frozen=True)
class ServeConfig:
    """Server settings. Limits are per process; 0 turns a limit off where noted.

    Attributes:
        api_keys: accepted bearer tokens; empty means no authentication (loopback only).
        max_body_bytes: largest request body; larger ones get 413 before being read in full.
        rate_limit: sustained requests per second per client (API key, else address); 0 = off.
        rate_burst: requests a client may send at once before the rate applies.
        max_inflight: generation calls (programs, completions) admitted at once; more get 503
            at once rather than queueing without bound.
        workers: threads running program calls; the engine batches whatever they submit.
        request_timeout: seconds a generation call may take before it is answered 504.
        header_timeout: seconds a client has to send a request's headers (from connecting, or
            from the previous response); a client that is slower is disconnected.
        body_timeout: seconds a client has to send a request's body once its headers are in.
        max_tokens_limit: the largest `max_tokens` an OpenAI-style request may ask for.
        trace_io: store request inputs and outputs in traces (off: only sizes and timings).
        dspy_cache: let DSPy answer repeated program calls from its cache.
        prompt_prefill: prompt-aware prefill (`plait.modules.prefill`): every predictor's
            instructions and demos are prefilled and pinned in the prefix cache at start-up,
            and a program's hints prefill a later stage's prompt in the engine's idle time.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    rate_limit: float = 0.0
    rate_burst: int = 20
    max_inflight: int = 64
    workers: int = 32
    request_timeout: float = 300.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_tokens_limit: int = 4096
    trace_io: bool = True
    dspy_cache: bool = False
    prompt_prefill: bool = True

    def check(self) -> ServeConfig:
        """Raise `ServeConfigError` for settings that cannot work; return self."""
        if not is_loopback(self.host) and not self.api_keys:
            raise ServeConfigError(
                f"refusing to serve on {self.host} without authentication: pass --api-key KEY "
                "(or set PLAIT_API_KEY), or bind to 127.0.0.1"
            )
        if any(not key or key.strip() != key for key in self.api_keys):
            raise ServeConfigError("an API key must be non-empty and have no surrounding whitespace")
        if not 0 <= self.port <= 65535:
            raise ServeConfigError(f"--port must be in 0..65535, not {self.port}")
        for name in ("max_body_bytes", "max_inflight", "workers", "max_tokens_limit", "rate_burst"):
            if getattr(self, name) < 1:
                raise ServeConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.rate_limit < 0:
            raise ServeConfigError("--rate-limit must be >= 0 (0 turns it off)")
        for name in ("request_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:  # NaN too
                raise ServeConfigError(f"--{name.replace('_', '-')} must be positive")
        return self

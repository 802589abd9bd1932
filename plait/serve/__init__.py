"""plait.serve: compiled DSPy programs over HTTP, plus OpenAI-compatible engine endpoints.

    from plait.serve import ServeConfig, ServeRuntime, create_app
    runtime = ServeRuntime(ServeConfig(api_keys=("secret",)), store=Store.open())
    runtime.load_artifact("sentiment.json")        # POST /v1/programs/sentiment
    app = create_app(runtime)                      # any ASGI server; `plait serve` runs uvicorn

Files, one idea each: `config` (settings and the no-public-bind-without-a-key rule), `app`
(routes), `programs` (a compiled program's inputs, calls and streams), `fields` (output fields
split from streamed text), `openai` (chat and text completions over the engine), `structured`
(structured-output parameters -> grammar), `limits` (rate, admission; auth and body size are
`plait.http_guard`, shared with the index server), `metrics`, `tracing` (traces to the store),
`bridge` (blocking work awaited from the event loop), `server` (uvicorn with header and body
read deadlines), `sse`, `errors`, `runtime` (what a running server holds), `commands` (the CLI).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeConfig": "plait.serve.config",
    "ServeRuntime": "plait.serve.runtime",
    "ServedProgram": "plait.serve.programs",
    "create_app": "plait.serve.app",
    "add_commands": "plait.serve.commands",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'plait.serve' has no attribute {name!r}")

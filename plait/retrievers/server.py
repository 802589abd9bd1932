"""The index server: `dspy.ColBERTv2`'s HTTP protocol over one shared, opened index.

    GET  /?query=...&k=10[&stage=hybrid]      -> {"topk": [{"text", "long_text", "pid", "score", ...}]}
    POST /   {"query": ..., "k": 10}           -> the same
    GET  /healthz                              -> {"status": "ok", "docs": N, ...}

Bad parameters answer 4xx with `{"error": true, "message": ...}`. Handlers are plain `def`s,
so FastAPI runs them on its worker threads; they all share the one `ColBERTServe` (whose
query encoder batches concurrent requests), opened once when the app is created.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from plait.errors import PlaitError
from plait.retrievers.colbert_serve import ColBERTServe

log = logging.getLogger(__name__)


class SearchRequest(BaseModel):
    query: str | None = None
    k: int = 10
    stage: str | None = None


def create_app(rm: ColBERTServe) -> FastAPI:
    app = FastAPI(title="plait index server", docs_url=None, redoc_url=None)
    app.state.rm = rm

    @app.exception_handler(PlaitError)
    def _plait_error(_: Request, exc: PlaitError) -> JSONResponse:
        return JSONResponse({"error": True, "message": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"error": True, "message": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422
        )

    def search(query: str | None, k: int, stage: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        passages = rm(query if query is not None else "", k=k, stage=stage)
        return {
            "query": query,
            "topk": [dict(p) for p in passages],
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }

    @app.get("/")
    def get_search(query: str | None = None, k: int = 10, stage: str | None = None) -> dict[str, Any]:
        return search(query, k, stage)

    @app.post("/")
    def post_search(body: SearchRequest) -> dict[str, Any]:
        return search(body.query, body.k, body.stage)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "docs": rm.num_docs, "index": str(rm.store.path), "stage": rm.stage}

    return app


def serve(rm: ColBERTServe, host: str = "127.0.0.1", port: int = 8893) -> None:
    """Run the server in this process until interrupted."""
    import uvicorn

    uvicorn.run(create_app(rm), host=host, port=port, log_level="info")

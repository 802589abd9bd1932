"""The index server: `dspy.ColBERTv2`'s HTTP protocol over one shared, opened index.

    GET  /?query=...&k=10[&stage=hybrid]      -> {"topk": [{"text", "long_text", "pid", "score", ...}]}
    POST /   {"query": ..., "k": 10}           -> the same
    GET  /healthz                              -> {"status": "ok", "docs": N, "stage": ...}

A passage's `text` and `long_text` are "Title | Body" (just the body without a title), as the
ColBERTv2 servers of DSPy's tutorials send them; `title` and the corpus `id` come apart too.

Every error answers `{"error": true, "message": ...}`: 4xx for a bad request (messages never
echo more than a short prefix of what was sent), 401 without the bearer token when keys are
set, 413 for a body over the limit, 500 (details in the server's log only) when the index
turns out damaged. Handlers are plain `def`s, so FastAPI runs them on its worker threads; they
all share the one `ColBERTServe` (whose query encoder batches concurrent requests).

Guard rails (`ServerSettings`), as for `plait serve`: a body-size limit checked before the body
is read, a query-length limit (a query is encoded to at most `query_maxlen` tokens anyway, but
analysing megabytes of text for BM25 takes seconds), bearer-token auth, and a refusal to bind a
non-loopback address without a key, because anyone who can reach the port can read the corpus.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from plait.errors import PlaitError
from plait.http_guard import BearerAuth, BodySizeLimit
from plait.retrievers.colbert_serve import ColBERTServe
from plait.retrievers.errors import BadQueryError, IndexCorruptError
from plait.retrievers.limits import ServerSettings

log = logging.getLogger(__name__)


class SearchRequest(BaseModel):
    query: str | None = None
    k: int = 10
    stage: str | None = None


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body (what `dspy.ColBERTv2` and curl users see)."""
    return JSONResponse({"error": True, "message": message}, status_code=status, headers=headers)


def create_app(rm: ColBERTServe, settings: ServerSettings | None = None) -> FastAPI:
    settings = (settings or ServerSettings()).check()
    app = FastAPI(title="plait index server", docs_url=None, redoc_url=None)
    app.state.rm = rm
    # The last middleware added runs first: authenticate, then read the (bounded) body.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, error=error_response)
    app.add_middleware(BearerAuth, keys=settings.api_keys, error=error_response)

    @app.exception_handler(PlaitError)
    def _plait_error(_: Request, exc: PlaitError) -> JSONResponse:
        if isinstance(exc, IndexCorruptError):  # the server's problem: the path stays in its log
            log.error("search failed on a damaged index: %s", exc)
            return error_response(500, "the index is damaged: see the server's log")
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(500, f"internal error ({type(exc).__name__}): see the server's log")

    def search(query: str | None, k: int, stage: str | None) -> dict[str, Any]:
        if query is not None and len(query) > settings.max_query_chars:
            raise BadQueryError(
                f"the query has {len(query)} characters; the limit is {settings.max_query_chars}"
            )
        started = time.perf_counter()
        topk = rm.colbertv2_topk(query if query is not None else "", k=k, stage=stage)
        return {
            "query": query,
            "topk": topk,
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
        return {"status": "ok", "docs": rm.num_docs, "stage": rm.stage}

    return app


def serve(rm: ColBERTServe, settings: ServerSettings) -> None:
    """Run the server in this process until interrupted."""
    import uvicorn

    uvicorn.run(create_app(rm, settings), host=settings.host, port=settings.port, log_level="info")

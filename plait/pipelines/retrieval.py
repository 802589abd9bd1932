"""How the reference pipelines find their retriever.

A pipeline takes `index` (a ColBERT-serve index directory, JSON-serialisable so it is saved
in the compiled artifact's `init` and the server can rebuild the program) or `retriever` (any
callable `rm(query, k) -> passages`, for tests and custom back ends). Without either, the
`PLAIT_INDEX` environment variable names the index. Indexes are opened once per process and
shared: DSPy optimizers copy programs many times, and an index is memory-mapped files plus
an encoder that must not be duplicated per copy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plait.errors import PlaitError

ENV_INDEX = "PLAIT_INDEX"
Retriever = Callable[..., Any]

_open: dict[str, Any] = {}
_lock = threading.Lock()


class RetrieverMissingError(PlaitError):
    """A retrieval pipeline ran without an index or retriever."""


def open_index(path: str | os.PathLike[str]) -> Retriever:
    """The process-wide `ColBERTServe` for the index at `path`."""
    key = str(Path(path).resolve())
    with _lock:
        if key not in _open:
            from plait.retrievers import ColBERTServe

            _open[key] = ColBERTServe.open(key)
        return _open[key]


def resolve(index: str | None, retriever: Retriever | None, *, pipeline: str) -> Retriever:
    if retriever is not None:
        return retriever
    index = index or os.environ.get(ENV_INDEX)
    if not index:
        raise RetrieverMissingError(
            f"{pipeline} needs a retrieval index: pass --program-arg index=DIR (build one with "
            f"`plait index build corpus.jsonl --out DIR`) or set {ENV_INDEX}"
        )
    return open_index(index)


def passage_text(passage: Any, max_chars: int) -> str:
    """'title | text', cut to `max_chars` (a small model's prompt stays small)."""
    if isinstance(passage, str):
        text = passage
    else:
        get = (
            passage.get
            if hasattr(passage, "get")
            else lambda key, default=None: getattr(passage, key, default)
        )
        body = get("long_text") or get("text") or ""
        title = get("title")
        body = str(body)
        # an index server already answers "title | body" (the wiki17 ColBERTv2 convention)
        text = f"{title} | {body}" if title and not body.startswith(f"{title} | ") else body
    return text if len(text) <= max_chars else text[: max_chars - 3].rstrip() + "..."


def search(retriever: Retriever, query: str, k: int, max_chars: int) -> list[str]:
    return [passage_text(p, max_chars) for p in retriever(query, k=k)]

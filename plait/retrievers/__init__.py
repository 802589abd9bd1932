"""ColBERT-serve retrieval: late interaction over a memory-mapped index, in stages.

    from plait.retrievers import build_index, ColBERTServe
    build_index("corpus.jsonl", "idx/")
    rm = ColBERTServe.open("idx/")
    rm("who wrote Hamlet", k=5)

Heavy modules (torch, bm25s) load on first use, so `import plait.retrievers` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.retrievers.errors import (
    BadQueryError,
    CorpusError,
    EncoderLoadError,
    IndexCorruptError,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
    SettingsError,
)

if TYPE_CHECKING:
    from plait.retrievers.build import build_index
    from plait.retrievers.colbert_serve import ColBERTServe, Passage
    from plait.retrievers.encoder import ColBERTEncoder, EncoderSettings
    from plait.retrievers.searcher import SearchParams

_LAZY = {
    "build_index": "plait.retrievers.build",
    "ColBERTServe": "plait.retrievers.colbert_serve",
    "Passage": "plait.retrievers.colbert_serve",
    "ColBERTEncoder": "plait.retrievers.encoder",
    "EncoderSettings": "plait.retrievers.encoder",
    "SearchParams": "plait.retrievers.searcher",
}

__all__ = [
    "BadQueryError",
    "ColBERTEncoder",
    "ColBERTServe",
    "CorpusError",
    "EncoderLoadError",
    "EncoderSettings",
    "IndexCorruptError",
    "IndexExistsError",
    "IndexFormatError",
    "IndexNotFoundError",
    "Passage",
    "SearchParams",
    "SettingsError",
    "build_index",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plait.retrievers' has no attribute {name!r}")

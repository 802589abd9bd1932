"""plait's database: compile runs, trials, per-example evaluations, artifacts, request traces.

    from plait.store import Store
    store = Store.open()      # PLAIT_DATABASE_URL, else SQLite (WAL) at .plait/plait.db

SQLAlchemy loads on first use, so `import plait.store` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plait.store.errors import StoreError

if TYPE_CHECKING:
    from plait.store.records import ArtifactRecord, EvaluationRecord, RunRecord, TraceRecord, TrialRecord
    from plait.store.session import default_url
    from plait.store.store import Store

_LAZY = {
    "Store": "plait.store.store",
    "default_url": "plait.store.session",
    "ArtifactRecord": "plait.store.records",
    "EvaluationRecord": "plait.store.records",
    "RunRecord": "plait.store.records",
    "TraceRecord": "plait.store.records",
    "TrialRecord": "plait.store.records",
}

__all__ = [
    "ArtifactRecord",
    "EvaluationRecord",
    "RunRecord",
    "Store",
    "StoreError",
    "TraceRecord",
    "TrialRecord",
    "default_url",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'plait.store' has no attribute {name!r}")

"""Plain, frozen copies of stored rows.

Readers return these instead of ORM objects so callers never hold a session open (the
server and the compile runner read from many threads) and never trigger lazy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunRecord:
    id: int
    kind: str
    key: str
    program_path: str
    config: dict[str, Any]
    status: str
    attempts: int
    score_before: float | None
    score_after: float | None
    tokens: int | None
    seconds: float | None
    summary: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None
    ideal_seconds: float | None = None


@dataclass(frozen=True)
class TrialRecord:
    id: int
    run_id: int
    number: int
    state_hash: str
    score: float | None
    params: dict[str, Any]
    created_at: datetime
    ideal_seconds_per_example: float | None = None


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    run_id: int
    phase: str
    state_hash: str
    example_hash: str
    example_index: int | None
    score: float
    prediction: dict[str, Any]
    parse_failure: bool
    error: str | None
    tokens: int
    latency_ms: float
    created_at: datetime
    ideal_seconds: float | None = None


@dataclass(frozen=True)
class ArtifactRecord:
    id: int
    program_path: str
    path: str
    sha256: str
    model: str
    plait_version: str
    score: float | None
    run_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class TraceRecord:
    id: int
    program: str
    request_id: str | None
    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    status: str
    error: str | None
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    created_at: datetime

"""The store's tables, as SQLAlchemy 2.x declarative models.

What is recorded, and why:

- `Program`: a program class (`module:Class` or `file.py:Class`) with the hash of its
  signatures; artifacts, runs and traces point at it so they can be grouped by program.
- `Artifact`: a compiled artifact written to disk (path, sha256, model, plait version).
- `Run`: one `plait compile` or `plait eval` invocation. `key` hashes everything that decides
  its result (program, data, metric, optimizer, model, seed, limits), so re-running the same
  command finds the same run and resumes it.
- `Trial`: one candidate program an optimizer scored, written as soon as it is scored.
- `Evaluation`: one example scored by one program state, written as soon as it is scored.
  `(run_id, state_hash, example_hash)` is the resume key: a finished example is never redone.
- `LMCall`: one LM response inside a run, keyed by a hash of the request, so an optimizer's
  internal calls replay from the database after a crash instead of running again. Its JSON
  holds the response (with its token usage), the tokens the grammar forced and the call's
  idealized seconds.

`ideal_seconds` columns hold idealized cost (`plait.backends.models.cost`): the seconds the LM
calls would take on the reference accelerator, beside the measured tokens and seconds; NULL
where the model has no cost model (a remote LM) or the row predates the column.
- `Trace`: one request served by `plait serve`.

Every JSON column holds plain JSON (no pickles), so the database can be read by any tool.
Columns added since a database was created are added to it when it is opened (`Store`), so
they are always nullable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Bumped whenever a table changes incompatibly; stored in `plait_meta`.
SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Every plait table; `Base.metadata.create_all` creates the schema."""


class Meta(Base):
    """Key/value facts about the database itself (the schema version)."""

    __tablename__ = "plait_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Program(Base):
    __tablename__ = "programs"
    __table_args__ = (UniqueConstraint("import_path", "signature_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    import_path: Mapped[str] = mapped_column(String(512))
    signature_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(256))
    plait_version: Mapped[str] = mapped_column(String(32))
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "compile" | "eval"
    key: Mapped[str] = mapped_column(String(64), index=True)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | finished | failed
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    score_before: Mapped[float | None] = mapped_column(Float, nullable=True)
    score_after: Mapped[float | None] = mapped_column(Float, nullable=True)
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    ideal_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # all its LM calls
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state_hash: Mapped[str] = mapped_column(String(64), default="")
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ideal_seconds_per_example: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Evaluation(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_resume", "run_id", "state_hash", "example_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    phase: Mapped[str] = mapped_column(String(32))  # baseline | final | picked | eval | optimize
    state_hash: Mapped[str] = mapped_column(String(64))
    example_hash: Mapped[str] = mapped_column(String(64))
    example_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    score: Mapped[float] = mapped_column(Float)
    prediction: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    parse_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ideal_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LMCall(Base):
    __tablename__ = "lm_calls"
    __table_args__ = (UniqueConstraint("run_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    key: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Trace(Base):
    __tablename__ = "traces"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    program: Mapped[str] = mapped_column(String(256), index=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

"""`Store`: the small API every part of plait uses to write and read the database.

    store = Store.open()                       # PLAIT_DATABASE_URL, else .plait/plait.db
    store.record_trace("sentiment", {"text": "..."}, {"label": "positive"}, 812.5, "ok", 57)

Writers commit immediately (one short transaction per call): a compile killed at any moment
keeps everything it had scored. A `Store` is safe to share between threads; on SQLite its
writes are serialised in-process (SQLite allows one writer at a time, and waiting on our own
lock is cheaper and more predictable than retrying on "database is locked").
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from plait.store.errors import StoreError
from plait.store.models import (
    SCHEMA_VERSION,
    Artifact,
    Base,
    Evaluation,
    LMCall,
    Meta,
    Program,
    Run,
    Trace,
    Trial,
    utcnow,
)
from plait.store.records import ArtifactRecord, EvaluationRecord, RunRecord, TraceRecord, TrialRecord
from plait.store.session import make_engine, make_sessionmaker


class Store:
    """Thread-safe access to plait's database. Create with `Store.open(url)`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._sessions = make_sessionmaker(engine)
        is_sqlite = engine.dialect.name == "sqlite"
        self._write_lock: contextlib.AbstractContextManager = (
            threading.RLock() if is_sqlite else contextlib.nullcontext()
        )

    @classmethod
    def open(cls, url: str | None = None, *, echo: bool = False) -> Store:
        """Connect to `url` (default: `PLAIT_DATABASE_URL`, else SQLite under `.plait/`) and
        create any missing tables."""
        store = cls(make_engine(url, echo=echo))
        store.create_schema()
        return store

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def create_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
            self._add_new_columns()
        except DBAPIError as exc:  # unreachable server, unwritable file, a file that is no database
            raise StoreError(f"cannot open the database at {self.url}: {exc.orig}") from exc
        with self._write() as session:
            meta = session.get(Meta, "schema_version")
            if meta is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(meta.value) != SCHEMA_VERSION:
                raise StoreError(
                    f"the database at {self.url} has schema version {meta.value}; this plait "
                    f"uses {SCHEMA_VERSION}. Point PLAIT_DATABASE_URL at a new database."
                )

    def _add_new_columns(self) -> None:
        """Add the columns a table gained since the database was created (`create_all` makes
        missing tables only). New columns are nullable, so adding them in place keeps every
        stored row, and an older plait still reads the database (it never selects them)."""
        existing = inspect(self.engine)
        preparer = self.engine.dialect.identifier_preparer
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=self.engine.dialect)
                statement = (
                    f"ALTER TABLE {preparer.format_table(table)} "
                    f"ADD COLUMN {preparer.format_column(column)} {kind}"
                )
                try:
                    with self._write_lock, self.engine.begin() as connection:
                        connection.execute(text(statement))
                except DBAPIError:  # another process opening the store added it first
                    if column.name not in {c["name"] for c in inspect(self.engine).get_columns(table.name)}:
                        raise

    def close(self) -> None:
        self.engine.dispose()

    # ---- sessions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A read session for ad-hoc queries on the ORM models."""
        with self._sessions() as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions() as session:
            try:
                with session.begin():
                    yield session
            except IntegrityError:
                raise
            except SQLAlchemyError as exc:
                raise StoreError(f"database write failed ({self.url}): {exc}") from exc

    # ---- programs and artifacts ------------------------------------------------------------
    def _program_id(self, session: Session, import_path: str, signature_hash: str) -> int:
        found = session.scalar(
            select(Program.id).where(
                Program.import_path == import_path, Program.signature_hash == signature_hash
            )
        )
        if found is not None:
            return found
        try:
            with session.begin_nested():  # another process may insert the same program first
                program = Program(import_path=import_path, signature_hash=signature_hash)
                session.add(program)
            return program.id
        except IntegrityError:
            return session.scalar(
                select(Program.id).where(
                    Program.import_path == import_path, Program.signature_hash == signature_hash
                )
            )

    def record_artifact(
        self,
        *,
        program_path: str,
        signature_hash: str,
        path: str,
        sha256: str,
        model: str,
        plait_version: str,
        run_id: int | None = None,
        score: float | None = None,
    ) -> int:
        with self._write() as session:
            artifact = Artifact(
                program_id=self._program_id(session, program_path, signature_hash),
                run_id=run_id,
                path=path,
                sha256=sha256,
                model=model,
                plait_version=plait_version,
                score=score,
            )
            session.add(artifact)
            session.flush()
            return artifact.id

    def artifacts(self, program_path: str | None = None) -> list[ArtifactRecord]:
        query = select(Artifact, Program.import_path).join(Program).order_by(Artifact.id)
        if program_path is not None:
            query = query.where(Program.import_path == program_path)
        with self.session() as session:
            return [
                ArtifactRecord(
                    a.id, path, a.path, a.sha256, a.model, a.plait_version, a.score, a.run_id, a.created_at
                )
                for a, path in session.execute(query)
            ]

    # ---- runs ------------------------------------------------------------------------------
    def start_run(
        self,
        *,
        kind: str,
        key: str,
        program_path: str,
        signature_hash: str,
        config: dict[str, Any],
        resume: bool = True,
    ) -> tuple[RunRecord, bool]:
        """Open the run for `key`: the latest one with that key when `resume` (its attempt count
        goes up and its status back to running), else a new one. Returns (run, resumed)."""
        with self._write() as session:
            run = None
            if resume:
                run = session.scalar(
                    select(Run).where(Run.kind == kind, Run.key == key).order_by(Run.id.desc()).limit(1)
                )
            resumed = run is not None
            if run is None:
                run = Run(
                    kind=kind,
                    key=key,
                    config=config,
                    status="running",
                    attempts=1,
                    program_id=self._program_id(session, program_path, signature_hash),
                )
                session.add(run)
            else:
                run.attempts += 1
                run.status = "running"
                run.error = None
                run.finished_at = None
            session.flush()
            return self._run_record(run, program_path), resumed

    def update_run(self, run_id: int, **values: Any) -> None:
        """Set result columns as they become known (score_before, tokens, summary, ...)."""
        allowed = {
            "score_before",
            "score_after",
            "tokens",
            "seconds",
            "ideal_seconds",
            "summary",
            "status",
            "error",
        }
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        with self._write() as session:
            session.execute(update(Run).where(Run.id == run_id).values(updated_at=utcnow(), **values))

    def finish_run(
        self, run_id: int, *, status: str = "finished", error: str | None = None, **values: Any
    ) -> None:
        self.update_run(run_id, status=status, error=error, **values)
        with self._write() as session:
            session.execute(update(Run).where(Run.id == run_id).values(finished_at=utcnow()))

    def get_run(self, run_id: int) -> RunRecord | None:
        with self.session() as session:
            row = session.execute(
                select(Run, Program.import_path).join(Program).where(Run.id == run_id)
            ).first()
            return None if row is None else self._run_record(*row)

    def runs(self, *, kind: str | None = None, key: str | None = None) -> list[RunRecord]:
        query = select(Run, Program.import_path).join(Program).order_by(Run.id)
        if kind is not None:
            query = query.where(Run.kind == kind)
        if key is not None:
            query = query.where(Run.key == key)
        with self.session() as session:
            return [self._run_record(run, path) for run, path in session.execute(query)]

    @staticmethod
    def _run_record(run: Run, program_path: str) -> RunRecord:
        return RunRecord(
            run.id,
            run.kind,
            run.key,
            program_path,
            dict(run.config or {}),
            run.status,
            run.attempts,
            run.score_before,
            run.score_after,
            run.tokens,
            run.seconds,
            dict(run.summary or {}),
            run.started_at,
            run.finished_at,
            run.ideal_seconds,
        )

    # ---- trials ----------------------------------------------------------------------------
    def record_trial(
        self,
        run_id: int,
        number: int,
        *,
        score: float | None,
        state_hash: str = "",
        params: dict[str, Any] | None = None,
        ideal_seconds_per_example: float | None = None,
    ) -> int:
        """Write trial `number` of a run; writing the same number again replaces it (a resumed
        run re-reports trials it replays). `ideal_seconds_per_example`: the candidate's mean
        idealized cost over the examples it was scored on."""
        with self._write() as session:
            trial = session.scalar(select(Trial).where(Trial.run_id == run_id, Trial.number == number))
            if trial is None:
                trial = Trial(run_id=run_id, number=number)
                session.add(trial)
            trial.score, trial.state_hash, trial.params = score, state_hash, dict(params or {})
            trial.ideal_seconds_per_example = ideal_seconds_per_example
            session.flush()
            return trial.id

    def trials(self, run_id: int) -> list[TrialRecord]:
        with self.session() as session:
            rows = session.scalars(select(Trial).where(Trial.run_id == run_id).order_by(Trial.number))
            return [
                TrialRecord(
                    t.id,
                    t.run_id,
                    t.number,
                    t.state_hash,
                    t.score,
                    dict(t.params or {}),
                    t.created_at,
                    t.ideal_seconds_per_example,
                )
                for t in rows
            ]

    # ---- per-example evaluations -----------------------------------------------------------
    def record_evaluation(
        self,
        run_id: int,
        *,
        phase: str,
        state_hash: str,
        example_hash: str,
        score: float,
        example_index: int | None = None,
        prediction: dict[str, Any] | None = None,
        parse_failure: bool = False,
        error: str | None = None,
        tokens: int = 0,
        latency_ms: float = 0.0,
        ideal_seconds: float | None = None,
    ) -> int:
        with self._write() as session:
            row = Evaluation(
                run_id=run_id,
                phase=phase,
                state_hash=state_hash,
                example_hash=example_hash,
                example_index=example_index,
                score=float(score),
                prediction=prediction or {},
                parse_failure=parse_failure,
                error=error,
                tokens=tokens,
                latency_ms=latency_ms,
                ideal_seconds=ideal_seconds,
            )
            session.add(row)
            session.flush()
            return row.id

    def cached_evaluations(self, run_id: int, state_hash: str) -> dict[str, EvaluationRecord]:
        """The finished examples of one program state in a run, by example hash (the resume
        lookup). Rows from the optimizer's own metric calls are not results of a whole
        program state and are not returned."""
        with self.session() as session:
            rows = session.scalars(
                select(Evaluation)
                .where(
                    Evaluation.run_id == run_id,
                    Evaluation.state_hash == state_hash,
                    Evaluation.phase != "optimize",
                )
                .order_by(Evaluation.id)
            )
            return {row.example_hash: self._evaluation_record(row) for row in rows}

    def evaluations(self, run_id: int, *, phase: str | None = None) -> list[EvaluationRecord]:
        query = select(Evaluation).where(Evaluation.run_id == run_id).order_by(Evaluation.id)
        if phase is not None:
            query = query.where(Evaluation.phase == phase)
        with self.session() as session:
            return [self._evaluation_record(row) for row in session.scalars(query)]

    @staticmethod
    def _evaluation_record(e: Evaluation) -> EvaluationRecord:
        return EvaluationRecord(
            e.id,
            e.run_id,
            e.phase,
            e.state_hash,
            e.example_hash,
            e.example_index,
            e.score,
            dict(e.prediction or {}),
            e.parse_failure,
            e.error,
            e.tokens,
            e.latency_ms,
            e.created_at,
            e.ideal_seconds,
        )

    # ---- LM calls (replayed on resume) -----------------------------------------------------
    def cached_lm_call(self, run_id: int, key: str) -> dict[str, Any] | None:
        with self.session() as session:
            return session.scalar(select(LMCall.response).where(LMCall.run_id == run_id, LMCall.key == key))

    def record_lm_call(self, run_id: int, key: str, response: dict[str, Any]) -> None:
        """Keep the first response for a key: two threads racing on one request both succeed."""
        try:
            with self._write() as session:
                session.add(LMCall(run_id=run_id, key=key, response=response))
        except IntegrityError:
            pass

    def lm_call_count(self, run_id: int) -> int:
        with self.session() as session:
            return (
                session.scalar(select(func.count()).select_from(LMCall).where(LMCall.run_id == run_id)) or 0
            )

    # ---- request traces (plait serve) ------------------------------------------------------
    def record_trace(
        self,
        program: str,
        inputs: dict[str, Any],
        outputs: dict[str, Any] | None,
        latency_ms: float,
        status: str,
        tokens: int = 0,
        *,
        error: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        request_id: str | None = None,
    ) -> int:
        """Record one served request. `status` is a short word ("ok", "error", "rejected") or an
        HTTP status; `tokens` the total the request used (prompt + completion)."""
        with self._write() as session:
            row = Trace(
                program=program,
                inputs=inputs,
                outputs=outputs,
                latency_ms=float(latency_ms),
                status=str(status),
                tokens=int(tokens or prompt_tokens + completion_tokens),
                error=error,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                request_id=request_id,
            )
            session.add(row)
            session.flush()
            return row.id

    def traces(
        self, program: str | None = None, *, limit: int = 100, since: datetime | None = None
    ) -> list[TraceRecord]:
        """The most recent traces first."""
        query = select(Trace).order_by(Trace.id.desc()).limit(limit)
        if program is not None:
            query = query.where(Trace.program == program)
        if since is not None:
            query = query.where(Trace.created_at >= since)
        with self.session() as session:
            return [
                TraceRecord(
                    t.id,
                    t.program,
                    t.request_id,
                    dict(t.inputs or {}),
                    t.outputs,
                    t.status,
                    t.error,
                    t.latency_ms,
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.tokens,
                    t.created_at,
                )
                for t in session.scalars(query)
            ]

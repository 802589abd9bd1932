"""The store on SQLite (always) and on a real PostgreSQL server (when PLAIT_TEST_POSTGRES_URL
is set, as .ci/run does): every writer and reader, resume keys, concurrency."""

import os
import threading
import uuid

import pytest
from sqlalchemy import text

from plait.store import Store, StoreError

POSTGRES_URL = os.environ.get("PLAIT_TEST_POSTGRES_URL")


def _postgres_store():
    """A Store in a fresh PostgreSQL schema, dropped afterwards (tests never share tables)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from plait.store.session import _with_driver

    url = make_url(_with_driver(POSTGRES_URL))
    schema = f"plait_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    scoped = url.update_query_dict({"options": f"-csearch_path={schema}"})
    store = Store.open(scoped.render_as_string(hide_password=False))
    try:
        yield store
    finally:
        store.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = Store.open(f"sqlite:///{tmp_path / 'plait.db'}")
        yield store
        store.close()
    else:
        if not POSTGRES_URL:
            pytest.skip("PLAIT_TEST_POSTGRES_URL is not set")
        yield from _postgres_store()


def _run(store, key="k1"):
    return store.start_run(
        kind="compile",
        key=key,
        program_path="pkg.mod:Prog",
        signature_hash="sig",
        config={"optimizer": "bootstrap", "limit": 4},
    )


def test_sqlite_default_is_wal_under_plait_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PLAIT_DATABASE_URL", raising=False)
    store = Store.open()
    try:
        assert (tmp_path / "home" / "plait.db").exists()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        store.close()


def test_database_url_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_DATABASE_URL", f"sqlite:///{tmp_path / 'other.db'}")
    store = Store.open()
    try:
        assert (tmp_path / "other.db").exists()
    finally:
        store.close()


@pytest.mark.parametrize("url", ["not a url", "garbage://x", "postgresql+nodriver://host/db"])
def test_bad_url_is_a_store_error(url):
    with pytest.raises(StoreError, match="database URL"):
        Store.open(url)


@pytest.mark.parametrize("url", ["postgresql://me:s3cret@db-host:port/plait", "://me:s3cret@db-host/plait"])
def test_a_broken_url_is_a_store_error_that_hides_its_password(url):
    with pytest.raises(StoreError, match="database URL") as raised:
        Store.open(url)
    assert "s3cret" not in str(raised.value) and "me:***@" in str(raised.value)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a SQLite database " * 4)
    with pytest.raises(StoreError, match="not a database"):
        Store.open(f"sqlite:///{path}")


def test_a_missing_sqlite_directory_is_refused_not_created(tmp_path, monkeypatch):
    """Only plait's own home is created; a directory the user names must exist."""
    target = tmp_path / "no" / "such" / "plait.db"
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(f"sqlite:///{target}")
    monkeypatch.setenv("PLAIT_DATABASE_URL", f"sqlite:///{target}")
    with pytest.raises(StoreError, match="does not exist"):
        Store.open()
    assert not (tmp_path / "no").exists()
    monkeypatch.delenv("PLAIT_DATABASE_URL")
    monkeypatch.setenv("PLAIT_HOME", str(tmp_path / "new" / "home"))
    Store.open().close()  # the default location is plait's own: made when missing
    assert (tmp_path / "new" / "home" / "plait.db").is_file()


def test_run_resume_by_key(store):
    run, resumed = _run(store)
    assert not resumed and run.status == "running" and run.attempts == 1
    store.update_run(run.id, score_before=50.0)
    again, resumed = _run(store)
    assert resumed and again.id == run.id and again.attempts == 2
    assert store.get_run(run.id).score_before == 50.0
    other, resumed = _run(store, key="k2")
    assert not resumed and other.id != run.id
    fresh, resumed = store.start_run(
        kind="compile", key="k1", program_path="pkg.mod:Prog", signature_hash="sig", config={}, resume=False
    )
    assert not resumed and fresh.id not in (run.id, other.id)
    store.finish_run(run.id, score_after=75.0, tokens=1234, seconds=2.5, summary={"forced_share": 0.4})
    done = store.get_run(run.id)
    assert (done.status, done.score_after, done.tokens, done.summary) == (
        "finished",
        75.0,
        1234,
        {"forced_share": 0.4},
    )
    assert done.finished_at is not None and done.program_path == "pkg.mod:Prog"
    assert [r.id for r in store.runs(kind="compile", key="k1")] == [run.id, fresh.id]


def test_trials_are_replaced_by_number(store):
    run, _ = _run(store)
    store.record_trial(run.id, 0, score=40.0, state_hash="s0", params={"demos": 0})
    store.record_trial(run.id, 1, score=55.0, state_hash="s1")
    store.record_trial(run.id, 0, score=41.0, state_hash="s0")
    trials = store.trials(run.id)
    assert [(t.number, t.score) for t in trials] == [(0, 41.0), (1, 55.0)]


def test_evaluations_cache_by_state_and_example(store):
    run, _ = _run(store)
    store.record_evaluation(
        run.id,
        phase="baseline",
        state_hash="s0",
        example_hash="e1",
        example_index=0,
        score=1.0,
        prediction={"label": "positive"},
        tokens=12,
        latency_ms=3.5,
    )
    store.record_evaluation(
        run.id,
        phase="baseline",
        state_hash="s0",
        example_hash="e2",
        example_index=1,
        score=0.0,
        parse_failure=True,
        error="bad",
    )
    store.record_evaluation(run.id, phase="optimize", state_hash="s0", example_hash="e3", score=1.0)
    store.record_evaluation(run.id, phase="final", state_hash="s1", example_hash="e1", score=0.0)
    cached = store.cached_evaluations(run.id, "s0")
    assert set(cached) == {"e1", "e2"}  # optimizer metric calls are not whole-program results
    assert cached["e1"].prediction == {"label": "positive"} and cached["e1"].tokens == 12
    assert cached["e2"].parse_failure and cached["e2"].error == "bad"
    assert [e.example_hash for e in store.evaluations(run.id, phase="final")] == ["e1"]
    assert len(store.evaluations(run.id)) == 4


def test_idealized_cost_is_stored_beside_tokens_and_seconds(store):
    run, _ = _run(store)
    store.record_evaluation(
        run.id, phase="eval", state_hash="s0", example_hash="e1", score=1.0, tokens=9, ideal_seconds=8e-5
    )
    store.record_evaluation(run.id, phase="eval", state_hash="s0", example_hash="e2", score=0.0)
    store.record_trial(run.id, 1, score=55.0, state_hash="s1", ideal_seconds_per_example=1.5e-4)
    store.finish_run(run.id, tokens=9, seconds=1.0, ideal_seconds=8e-5)
    assert [e.ideal_seconds for e in store.evaluations(run.id)] == [8e-5, None]  # None: not priced
    assert store.trials(run.id)[0].ideal_seconds_per_example == 1.5e-4
    assert store.get_run(run.id).ideal_seconds == 8e-5


NEW_COLUMNS = {"runs": "ideal_seconds", "trials": "ideal_seconds_per_example", "evaluations": "ideal_seconds"}


def test_a_database_from_before_the_cost_columns_gains_them_when_opened(store):
    run, _ = _run(store)
    store.record_evaluation(run.id, phase="eval", state_hash="s0", example_hash="e1", score=1.0, tokens=7)
    store.record_trial(run.id, 1, score=50.0, state_hash="s1")
    with store.engine.begin() as connection:  # the database as plait wrote it before these columns
        for table, column in NEW_COLUMNS.items():
            connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    url = store.engine.url.render_as_string(hide_password=False)
    store.engine.dispose()
    reopened = Store.open(url)
    try:
        assert reopened.evaluations(run.id)[0].tokens == 7  # old rows kept, their cost unknown
        assert reopened.evaluations(run.id)[0].ideal_seconds is None
        assert reopened.trials(run.id)[0].ideal_seconds_per_example is None
        reopened.record_evaluation(
            run.id, phase="eval", state_hash="s0", example_hash="e2", score=1.0, ideal_seconds=2e-4
        )
        reopened.finish_run(run.id, ideal_seconds=2e-4)
        assert reopened.evaluations(run.id)[1].ideal_seconds == 2e-4
        assert reopened.get_run(run.id).ideal_seconds == 2e-4
        Store.open(url).close()  # opening again adds nothing twice
    finally:
        reopened.close()


def test_lm_calls_keep_the_first_response(store):
    run, _ = _run(store)
    assert store.cached_lm_call(run.id, "abc") is None
    store.record_lm_call(run.id, "abc", {"text": "first"})
    store.record_lm_call(run.id, "abc", {"text": "second"})
    assert store.cached_lm_call(run.id, "abc") == {"text": "first"}
    assert store.lm_call_count(run.id) == 1


def test_artifacts(store):
    run, _ = _run(store)
    aid = store.record_artifact(
        program_path="pkg.mod:Prog",
        signature_hash="sig",
        path="/tmp/a.json",
        sha256="ff" * 32,
        model="smollm2-135m",
        plait_version="0.1.0",
        run_id=run.id,
        score=80.0,
    )
    (artifact,) = store.artifacts("pkg.mod:Prog")
    assert artifact.id == aid and artifact.run_id == run.id and artifact.score == 80.0
    assert store.artifacts("other:Prog") == []


def test_traces_from_many_threads(store):
    def serve(worker: int) -> None:
        for i in range(10):
            store.record_trace(
                "sentiment",
                {"text": f"{worker}-{i}"},
                {"label": "positive"},
                12.5,
                "ok",
                prompt_tokens=30,
                completion_tokens=2,
                request_id=f"{worker}-{i}",
            )

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.record_trace("sentiment", {"text": "x"}, None, 1.0, "error", error="boom")
    traces = store.traces("sentiment", limit=1000)
    assert len(traces) == 81
    assert traces[0].status == "error" and traces[0].outputs is None and traces[0].error == "boom"
    assert all(t.tokens == 32 for t in traces[1:])
    assert len({t.request_id for t in traces[1:]}) == 80
    assert store.traces("other") == []
    assert len(store.traces(limit=5)) == 5

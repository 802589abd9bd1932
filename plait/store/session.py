"""Database engines and sessions: which URL, and how each backend is set up.

The default is SQLite at `<plait home>/plait.db` in WAL mode, so a compile (one writer) and
readers (a dashboard, `plait eval`) never block each other, and a crashed writer loses at most
the row it was writing. `PLAIT_DATABASE_URL` (or `--db`) selects any SQLAlchemy URL instead,
for example `postgresql+psycopg://user:pass@host/db`; a bare `postgresql://` URL is given the
psycopg (v3) driver when psycopg2 is not installed, since psycopg is what plait documents.

plait creates only its own home directory for the default database. The directory of a SQLite
file the user names must exist: a typo in `--db` should be an error, not a new directory tree
somewhere outside the project.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from plait.paths import plait_home
from plait.store.errors import StoreError

ENV_URL = "PLAIT_DATABASE_URL"


def default_url() -> str:
    """`PLAIT_DATABASE_URL` if set, else SQLite under plait's home directory."""
    return os.environ.get(ENV_URL) or f"sqlite:///{plait_home() / 'plait.db'}"


def _with_driver(url: str) -> str:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        shown = re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)  # a password stays out of logs
        raise StoreError(
            f"not a database URL: {shown!r} (expected e.g. sqlite:///path.db or "
            "postgresql+psycopg://user:pass@host/db)"
        ) from exc
    if parsed.drivername == "postgresql" and importlib.util.find_spec("psycopg2") is None:
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, crash-safe
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _check_sqlite_directory(database: str | None) -> None:
    """A SQLite file's directory must exist (SQLite creates the file, never its directory)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    directory = Path(database).parent
    if not directory.is_dir():
        raise StoreError(
            f"the directory of the database {database} does not exist ({directory}): create it, "
            f"or leave --db out to use {plait_home() / 'plait.db'}"
        )


def make_engine(url: str | None = None, *, echo: bool = False) -> Engine:
    """A SQLAlchemy engine for `url` (default: `default_url()`), ready for many threads."""
    if not (url or os.environ.get(ENV_URL)):
        plait_home().mkdir(parents=True, exist_ok=True)  # the default location is plait's own
    url = _with_driver(url or default_url())
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    try:
        if parsed.get_backend_name() == "sqlite":
            _check_sqlite_directory(parsed.database)
            engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=8, max_overflow=16)
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"the database driver for {parsed.drivername!r} is not installed ({exc.name}); "
            "for PostgreSQL: pip install 'psycopg[binary]'"
        ) from exc
    except ArgumentError as exc:  # NoSuchModuleError: no dialect of that name
        raise StoreError(
            f"cannot use the database URL {shown!r}: {exc} (expected e.g. sqlite:///path.db or "
            "postgresql+psycopg://user:pass@host/db)"
        ) from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Records are copied out of the session before it closes, so nothing needs to stay attached.
    return sessionmaker(engine, expire_on_commit=False)

"""Database engine and session factory, SQLite pragmas, and the schema-version check."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# A writer waiting for SQLite's write lock retries after at most this long. With a 2 ms cap,
# single submits beside a busy worker spent a third of their time asleep past the lock's
# release: 270-303 jobs/s end to end, 321-341 with 0.25 ms (echo engine, Zen 4, same runs).
WRITE_LOCK_MAX_PAUSE_SECONDS = 0.00025
WRITE_OPTION = "genq_write"  # execution option of write transactions (BEGIN IMMEDIATE on SQLite)
# Execution option of write transactions whose loss in a power failure or OS crash is harmless
# (a worker's claim: lost, the job is queued again and its unacked message redelivered). Their
# commit skips the disk flush (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off);
# it stays atomic, and the next durable commit flushes it too (WAL order). On few cores a
# flush costs ~2.6 ms of held write lock; a single-submit job paid three.
LAZY_OPTION = "genq_lazy"


class SchemaOutOfDate(RuntimeError):
    pass


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                           connect_args={"connect_timeout": 5} if "psycopg" in url else {})
    event.listen(engine, "begin", _postgres_begin)
    return engine


def _postgres_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(LAZY_OPTION):
        # psycopg opens the transaction with this statement: SET LOCAL lasts until its end.
        conn.connection.dbapi_connection.execute("SET LOCAL synchronous_commit TO OFF")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # let the "begin" event issue BEGIN IMMEDIATE
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # FULL: a commit is on disk before the 202 goes out, even across a power loss (NORMAL in
    # WAL mode keeps it safe from a process crash only); a lazy write sets NORMAL for itself.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    """Readers BEGIN (deferred): in WAL mode they never wait for a writer. Writers BEGIN
    IMMEDIATE, so they queue for the write lock here instead of failing with "database is
    locked" at commit, and they retry every fraction of a millisecond: SQLite's own busy
    handler sleeps 1, 2, 5, 10 … ms between tries, which costs every writer milliseconds
    whenever two of them meet (a worker's commits and an API's submits meet all the time)."""
    raw = conn.connection.dbapi_connection
    options = conn.get_execution_options()
    if not options.get(WRITE_OPTION):
        raw.execute("BEGIN")
        return
    # Per transaction (pooled connections serve both kinds): FULL, a commit is on disk before
    # the 202 goes out, even across a power loss.
    raw.execute(f"PRAGMA synchronous={'NORMAL' if options.get(LAZY_OPTION) else 'FULL'}")
    raw.execute("PRAGMA busy_timeout=0")
    deadline, pause = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000, 0.00005
    try:
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, WRITE_LOCK_MAX_PAUSE_SECONDS)
    finally:
        raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    """Sessions for reading. Write through `transaction`."""
    return sessionmaker(get_engine(url), expire_on_commit=False)


@lru_cache(maxsize=16)
def _write_engine(url: str, lazy: bool = False) -> Engine:
    return get_engine(url).execution_options(**{WRITE_OPTION: True, LAZY_OPTION: lazy})


@lru_cache(maxsize=16)
def _write_sessions(url: str, lazy: bool = False) -> sessionmaker[Session]:
    return sessionmaker(_write_engine(url, lazy), expire_on_commit=False)


@contextmanager
def transaction(url: str, *, lazy: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception. `lazy`: a write whose
    loss in a power failure is harmless commits without a disk flush (LAZY_OPTION)."""
    with _write_sessions(url, lazy)() as session, session.begin():
        yield session


@contextmanager
def core_transaction(url: str, *, lazy: bool = False) -> Iterator[Connection]:
    """`transaction` for Core statements alone, on a bare connection: a hot path (a submit)
    skips the ORM Session, whose bookkeeping cost as much as one of its statements."""
    with _write_engine(url, lazy).begin() as connection:
        yield connection


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def ensure_schema_current(url: str) -> None:
    """API and workers call this at start: refuse to run on a schema Alembic has not upgraded."""
    current, head = current_revision(url), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at revision {current or 'none'}, this genq needs {head}: "
            f"run `genq db upgrade` (database {_redact(url)})"
        )


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)

"""Database engines and migrations: SQLite in the data dir by default, PostgreSQL by URL."""

from __future__ import annotations

import errno
import importlib.resources
import math
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeout

if TYPE_CHECKING:
    from alembic.config import Config

SQLITE_FILE = "nbia-proxy.sqlite3"
#: The newest migration in ``migrations/versions`` (a test keeps the two in step).
SCHEMA_HEAD = "0004"


def database_url(configured: str | None, data_dir: Path) -> str:
    """The configured URL, normalised, or the embedded SQLite file in ``data_dir``."""
    if not configured:
        return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"
    # postgres:// and postgresql:// both mean the psycopg (v3) driver here.
    for prefix in ("postgres://", "postgresql://"):
        if configured.startswith(prefix):
            return "postgresql+psycopg://" + configured[len(prefix) :]
    return configured


def upsert_insert(engine: Engine) -> Any:
    """The ``insert`` construct with ``on_conflict_do_*`` for ``engine``'s dialect (PostgreSQL's
    or SQLite's). Imported here, on first use: a gateway on SQLite never loads the PostgreSQL
    dialect (about 2 MB of RSS)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


#: The default bound on a wait for the database (see ``database_timeout_seconds``).
DEFAULT_TIMEOUT_SECONDS = 2.0


def make_engine(
    url: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, **options: Any
) -> Engine:
    """An engine with the settings each backend needs under concurrent use.

    ``timeout_seconds`` bounds the wait for a pooled connection and, on PostgreSQL, for a new
    one: a database that is down must cost a request that long, not the pool's default 30 s.
    """
    pool_timeout = max(timeout_seconds, 0.1)
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            # The busy timeout stays long: it absorbs other processes' writes to the same file
            # (a request's read is bounded apart from it, see proxy.cache.tiers).
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=8,
            max_overflow=8,
            pool_timeout=pool_timeout,
            **options,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # libpq counts connect_timeout in whole seconds and treats less than 2 as 2.
    connect_args = {"connect_timeout": max(2, math.ceil(timeout_seconds))}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
        pool_timeout=pool_timeout,
        connect_args=connect_args,
        **options,
    )


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    cursor = connection.cursor()
    # WAL lets readers work while the single writer commits; busy_timeout absorbs the rest
    # (the "database is locked" errors other SQLite caches hit under concurrent load).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # Debian's SQLite zeroes every freed page (SECURE_DELETE), so deleting a table's rows
    # writes the whole table to the WAL again: a purge would need as much free disk as the
    # cache holds. FAST still clears deleted content from the pages a delete writes anyway.
    cursor.execute("PRAGMA secure_delete=FAST")
    cursor.close()


def describe_failure(exc: BaseException) -> str:
    """A failure in one line for logs and error answers: a driver's own words, if any."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        lines = str(exc.orig).strip().splitlines()  # "database or disk is full"
        words = lines[0] if lines else type(exc.orig).__name__
    else:
        lines = str(exc).strip().splitlines()
        words = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    # Messages can quote the undecodable text that caused them.
    return words[:300].encode("utf-8", "backslashreplace").decode("utf-8")


def is_disk_full(exc: BaseException) -> bool:
    """Whether a database failure says its disk is full (SQLite, PostgreSQL or the OS)."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(cause, sqlite3.Error):
        return getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    if isinstance(cause, OSError):
        return cause.errno == errno.ENOSPC
    return getattr(cause, "sqlstate", None) == "53100"  # PostgreSQL's disk_full


#: SQLite result codes that say the file cannot be used for now (rather than refusing one
#: statement, or being full or read-only, which the writer reports on its own).
_SQLITE_UNREACHABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_AUTH,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_NOTADB,
    }
)


def is_unreachable(exc: BaseException) -> bool:
    """Whether a database failure says it cannot be reached now (refused, timed out, the pool
    exhausted, the file locked or unreadable): an outage, not a refusal of what was asked."""
    if isinstance(exc, (SQLAlchemyTimeout, TimeoutError)):
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    if is_disk_full(exc):
        return False
    cause = exc.orig
    if isinstance(cause, sqlite3.Error):
        code = getattr(cause, "sqlite_errorcode", None)
        if code is None:
            return "locked" in str(cause) or "unable to open" in str(cause)
        return code & 0xFF in _SQLITE_UNREACHABLE
    state = getattr(cause, "sqlstate", None)
    # No SQLSTATE: the connection failed or broke (psycopg's own OperationalError); class 08
    # is a connection exception, 57P0x the server shutting down or not yet accepting.
    return state is None or state.startswith("08") or state.startswith("57P")


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` using the packaged ``migrations`` scripts."""
    # Imported here: Alembic (and Mako) only matter while migrating, not in a serving process.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(importlib.resources.files("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def is_current(url: str) -> bool:
    """True when the database is already at :data:`SCHEMA_HEAD` (checked without Alembic)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return found == SCHEMA_HEAD
    except SQLAlchemyError:
        return False  # no database or no version table yet
    finally:
        engine.dispose()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creating it from empty if need be)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command

    command.upgrade(alembic_config(url), revision)

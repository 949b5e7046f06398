"""Database engines and migrations: SQLite in the data dir by default, PostgreSQL by URL."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

SQLITE_FILE = "nbia-proxy.sqlite3"


def database_url(configured: str | None, data_dir: Path) -> str:
    """The configured URL, normalised, or the embedded SQLite file in ``data_dir``."""
    if not configured:
        return f"sqlite:///{(data_dir / SQLITE_FILE).resolve()}"
    # postgres:// and postgresql:// both mean the psycopg (v3) driver here.
    for prefix in ("postgres://", "postgresql://"):
        if configured.startswith(prefix):
            return "postgresql+psycopg://" + configured[len(prefix) :]
    return configured


def make_engine(url: str, **options: Any) -> Engine:
    """An engine with the settings each backend needs under concurrent use."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=8,
            max_overflow=8,
            **options,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, **options)


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    cursor = connection.cursor()
    # WAL lets readers work while the single writer commits; busy_timeout absorbs the rest
    # (the "database is locked" errors other SQLite caches hit under concurrent load).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def alembic_config(url: str) -> Config:
    """An Alembic configuration for ``url`` using the packaged ``migrations`` scripts."""
    config = Config()
    config.set_main_option("script_location", str(importlib.resources.files("migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creating it from empty if need be)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)

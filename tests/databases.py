"""Database URLs for tests: an SQLite file, or a private schema in the PostgreSQL test database.

PostgreSQL is found at ``NBIA_PROXY_TEST_POSTGRES_URL`` (default: the local ``test`` database
with trust auth). When it cannot be reached the PostgreSQL variants skip with the reason,
unless ``NBIA_PROXY_TEST_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which turns that into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def postgres_url() -> str:
    return os.environ.get("NBIA_PROXY_TEST_POSTGRES_URL", DEFAULT_POSTGRES)


@contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    """Yield a URL for an empty database of ``backend``, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'cache.sqlite3'}"
        return
    admin = create_engine(postgres_url(), isolation_level="AUTOCOMMIT")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except OperationalError as exc:
        admin.dispose()
        reason = f"PostgreSQL not reachable at {postgres_url()}: {exc.orig}"
        if os.environ.get("NBIA_PROXY_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    separator = "&" if "?" in postgres_url() else "?"
    try:
        yield f"{postgres_url()}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

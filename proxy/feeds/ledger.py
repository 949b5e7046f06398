"""Where the update feeds stand, in the database every replica shares, and who may poll.

Blocking: call from a thread. Only one process polls an upstream at a time. On PostgreSQL that
is a session advisory lock held on a connection of its own for the length of a poll, so the
gateway must reach PostgreSQL directly or through a pooler in *session* mode (PgBouncer's
transaction pooling would hand the lock's session to someone else). On SQLite, which only
processes of one machine share, it is an exclusive ``flock`` on a file beside the database.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.orm import Session

from proxy.datadir import sqlite_file
from proxy.db import upsert_insert
from proxy.feeds.plan import Form
from proxy.feeds.tables import FeedPosition


@dataclass(frozen=True, slots=True)
class Position:
    """One upstream's row of :class:`FeedPosition`, read."""

    upstream: str
    last_success: float | None = None
    last_attempt: float | None = None
    failures: int = 0
    last_error: str | None = None
    seen: dict[str, str] = field(default_factory=dict)
    form: Form | None = None


class Ledger:
    """The feed positions and the polling lock on the gateway's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._insert = upsert_insert(engine)

    def read(self, upstream: str) -> Position:
        """Where ``upstream``'s feeds stand (never polled: an empty position)."""
        with Session(self.engine) as session:
            row = session.get(FeedPosition, upstream)
            if row is None:
                return Position(upstream)
            try:
                seen = json.loads(row.seen or "{}")
            except ValueError:
                seen = {}
            form = row.form if row.form in ("v2", "v4") else None
            return Position(
                upstream,
                row.last_success,
                row.last_attempt,
                row.failures or 0,
                row.last_error,
                seen if isinstance(seen, dict) else {},
                form,  # type: ignore[arg-type]
            )

    def succeeded(self, upstream: str, started: float, seen: dict[str, str], form: Form) -> None:
        """A poll that began at ``started`` went through: the next window reaches back from it."""
        self._upsert(
            upstream,
            last_success=started,
            last_attempt=started,
            failures=0,
            last_error=None,
            seen=json.dumps(seen, sort_keys=True),
            form=form,
        )

    def failed(self, upstream: str, attempted: float, error: str) -> None:
        """A poll failed: counted, so that every replica backs off alike."""
        with Session(self.engine) as session, session.begin():
            row = session.get(FeedPosition, upstream, with_for_update=True)
            failures = 1 if row is None else (row.failures or 0) + 1
        self._upsert(upstream, last_attempt=attempted, failures=failures, last_error=error[:500])

    def _upsert(self, upstream: str, **values: object) -> None:
        statement = self._insert(FeedPosition).values(
            upstream=upstream, **{"failures": 0, "seen": "{}", **values}
        )
        with self.engine.begin() as connection:
            connection.execute(
                statement.on_conflict_do_update(index_elements=["upstream"], set_=values)
            )

    def acquire(self, upstream: str) -> Lease | None:
        """The right to poll ``upstream`` until :meth:`Lease.release`; None when another
        process holds it now (then poll nothing)."""
        if self.engine.dialect.name == "postgresql":
            connection = self.engine.connect()
            try:
                schema = connection.execute(text("SELECT current_schema()")).scalar() or ""
                key = lock_key(str(schema), upstream)
                query = text("SELECT pg_try_advisory_lock(:k)")
                held = bool(connection.execute(query, {"k": key}).scalar())
                connection.commit()  # the lock is the session's: it outlives the transaction
            except BaseException:
                connection.close()
                raise
            if not held:
                connection.close()
                return None
            return Lease(connection=connection, key=key)
        path = _lock_file(self.engine, upstream)
        if path is None:  # an in-memory database: this process is the only one
            return Lease()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return Lease(fd=fd)


@dataclass
class Lease:
    """A held polling lock: an advisory lock on its own connection, or a locked file."""

    connection: Connection | None = None
    key: int = 0
    fd: int | None = None

    def release(self) -> None:
        """Give the lock up (closing the connection or file would too)."""
        if self.connection is not None:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self.connection.commit()
            finally:
                self.connection.close()
                self.connection = None
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_key(schema: str, upstream: str) -> int:
    """The advisory lock key of an upstream's feeds: one per schema (deployments sharing a
    database in different schemas do not block each other), as PostgreSQL's signed bigint."""
    digest = hashlib.sha256(f"nbia-proxy feeds\n{schema}\n{upstream}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_file(engine: Engine, upstream: str) -> Path | None:
    database = sqlite_file(engine.url.render_as_string(hide_password=False))
    if database is None:
        return None
    return database.with_name(f"{database.name}.feeds-{upstream}.lock")

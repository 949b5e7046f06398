"""Checks a command runs before it starts: the data dir and the database can be used.

Values are checked in :mod:`proxy.config`; what needs the file system or the network is checked
here, so that a mistake is one line saying what to do (a :class:`CommandError`) instead of a
traceback from deep inside SQLite, psycopg or uvicorn's start-up.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pwd
import re
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.exc import SQLAlchemyError

#: Exit status when the invocation must change (a flag, a setting, a path, a credential).
USAGE = 2
#: Exit status when something the command needs failed (a server that does not answer).
FAILURE = 1
#: How long ``serve`` and the commands wait for PostgreSQL before giving up.
CONNECT_TIMEOUT_SECONDS = 5

# psycopg's "connection failed: connection to server at "h", port 5432 failed: FATAL:  ..."
_PSYCOPG_NOISE = re.compile(
    r'^(connection failed: )?(connection to server at "[^"]*"(, port \d+)? failed: )?(FATAL:\s+)?'
)


class CommandError(Exception):
    """Why a command cannot run, as one line that says what to do, and its exit status."""

    def __init__(self, message: str, exit_status: int = USAGE) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def check_data_dir(path: Path) -> None:
    """The data dir is a writable directory, or can be created as one in an existing parent."""
    _check_directory("data_dir", path)


def check_audit_log(settings: Settings) -> None:
    """A configured audit log file can be opened for appending (it is created 0600)."""
    target = settings.audit_log
    if target in (None, "", "-"):
        return  # the default (in the data dir, checked with it), off, or stderr
    assert target is not None
    path = Path(target)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise CommandError(
                f"audit_log {path} cannot be created: {path.parent} does not exist "
                "(create it first)"
            ) from None
        raise CommandError(
            f"audit_log {path} cannot be opened for appending by {_user()} ({exc.strerror}): "
            f"{_remedy(path if path.exists() else path.parent, exc)}"
        ) from None


def check_listen(host: str, port: int) -> None:
    """The gateway can listen on ``host``:``port``: the name resolves, the address is this
    machine's and nothing else holds the port (checked by binding, then letting go)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CommandError(f"host {host} cannot be listened on: {exc.strerror}") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CommandError(
                    f"port {port} on {host} is in use (another gateway?): stop it or give "
                    "another port",
                    FAILURE,
                ) from None
            if exc.errno == errno.EACCES:
                raise CommandError(
                    f"port {port} needs privileges this user lacks: give a port above 1023"
                ) from None
            raise CommandError(
                f"host {host} cannot be listened on ({exc.strerror}): give an address of this "
                "machine"
            ) from None


def check_database(settings: Settings) -> str:
    """The configured database can be opened for writing; returns its URL."""
    # SQLAlchemy is imported here, not at the top: a settings mistake is reported at once.
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    from proxy.db import database_url

    url = database_url(settings.database_url, settings.data_dir)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            setting = "database_url" if settings.database_url else "data_dir"
            _check_sqlite_file(setting, Path(parsed.database))
        return url
    if importlib.util.find_spec("psycopg") is None:
        raise CommandError("PostgreSQL needs the psycopg package: pip install 'psycopg[binary]'")
    engine = create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    )
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise database_failure(exc, url) from None
    finally:
        engine.dispose()
    return url


def database_failure(exc: SQLAlchemyError, url: str) -> CommandError:
    """One line for a database error: where (never the password) and the driver's reason."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    cause = _PSYCOPG_NOISE.sub("", cause)
    if parsed.get_backend_name() == "sqlite":
        return CommandError(f"the database {parsed.database} failed: {cause}", FAILURE)
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    return CommandError(
        f"cannot use PostgreSQL at {where} (database {parsed.database}): {cause}", FAILURE
    )


def _check_sqlite_file(setting: str, file: Path) -> None:
    # The file and its WAL companions first: a read-only database is the likelier mistake.
    for path in (file, file.with_name(file.name + "-wal"), file.with_name(file.name + "-shm")):
        try:
            with path.open("r+b"):
                pass
        except FileNotFoundError:
            continue
        except IsADirectoryError:
            raise CommandError(f"the database {path} is a directory, not a file") from None
        except OSError as exc:
            raise CommandError(
                f"the database {path} is read-only for {_user()} ({exc.strerror}): "
                f"{_remedy(path, exc)}"
            ) from None
    _check_directory(setting, file.parent)


def _check_directory(setting: str, path: Path) -> None:
    try:
        if path.is_dir():
            _probe_writable(f"{setting} {path} is not writable", path)
            return
        if path.exists():
            raise CommandError(
                f"{setting} {path} is not a directory: name a directory (it is created if missing)"
            )
        parent = path.absolute().parent
        existing = next(p for p in path.absolute().parents if p.exists())
    except OSError as exc:
        raise CommandError(f"{setting} {path} cannot be examined: {exc.strerror}") from None
    if not existing.is_dir():
        raise CommandError(f"{setting} {path} cannot be created: {existing} is not a directory")
    if existing != parent:
        # Only the last directory is created: a typo in a parent must not grow a new tree
        # (with an empty cache and new secrets) somewhere unexpected.
        raise CommandError(
            f"{setting} {path} cannot be created: {parent} does not exist (create it first)"
        )
    _probe_writable(f"{setting} {path} cannot be created: {parent} is not writable", parent)


def _probe_writable(problem: str, directory: Path) -> None:
    """Create and drop a nameless file: the real test (modes, ACLs, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".nbia-proxy-probe-"):
            pass
    except OSError as exc:
        raise CommandError(
            f"{problem} by {_user()} ({exc.strerror}): {_remedy(directory, exc)}"
        ) from None


def _remedy(path: Path, exc: OSError) -> str:
    """What to do about a path this user may not write."""
    if exc.errno == errno.EROFS:
        return "choose a place on a writable file system"
    try:
        owner = path.stat().st_uid
    except OSError:
        return "fix its permissions"
    if owner == os.geteuid():
        return f"make it writable (chmod u+w {path})"
    return f"run as its owner ({_name_of(owner)}) or fix its permissions"


def _user() -> str:
    return _name_of(os.geteuid())


def _name_of(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"

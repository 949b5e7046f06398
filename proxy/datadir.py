"""The data dir and the SQLite files in it: readable by the service user alone.

The database holds the lab users' key hashes and, unless ``token_secret_file`` is set, the
secret that signs gateway tokens: whoever can read it can mint an admin token. So the data dir
is made 0700 and the database 0600. SQLite gives its side files (``-wal``, ``-shm``,
``-journal``) the database file's mode whatever the umask, so creating the database 0600
before SQLite first opens it covers the files to come. Files an older version left open to
others are made private at start, with one warning per file changed.

Only what is the gateway's own is changed: the data dir (unless it also holds files that are
not the gateway's, say a home directory) and the database files in it. A SQLite file the user
put elsewhere and the ``token_secret_file`` are the user's choice (a group may share them on
purpose, a mounted secret may be read-only): too open, they are warned about, not changed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from proxy.audit import AUDIT_FILE
from proxy.config import Settings
from proxy.db import SQLITE_FILE, database_url

log = logging.getLogger("nbia_proxy.datadir")

_OTHERS = 0o077  # the group's and everybody else's permission bits
_SIDE_FILES = ("-wal", "-shm", "-journal")
_OWN_PREFIX = SQLITE_FILE.partition(".")[0]  # "nbia-proxy": what the gateway keeps there
#: The gateway's own entries in the data dir that do not start with the prefix.
_OWN_NAMES = frozenset({"binaries"})  # the default binary_dir


def prepare(settings: Settings) -> None:
    """Create the data dir (0700) and, when the gateway keeps a SQLite database, the database
    file (0600); make what is the gateway's own private if it is open to others."""
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    uses_database = settings.cache_enabled or settings.access == "accounts"
    database = sqlite_file(database_url(settings.database_url, data_dir))
    if not uses_database:
        database = None
    inside = database is not None and database.parent == data_dir.resolve()
    own = set(_OWN_NAMES) | ({database.name} if inside and database is not None else set())
    if all(_is_own(entry) or entry in own for entry in os.listdir(data_dir)):
        keep_private(data_dir)
    else:
        keep_private(data_dir, owner="the data dir holds other files too")
    if database is None:
        return
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _create_private(database)
    for path in [database, *(Path(f"{database}{suffix}") for suffix in _SIDE_FILES)]:
        if path.exists():
            keep_private(path, owner=None if inside else "it is outside the data dir")


def _is_own(entry: str) -> bool:
    """The gateway's own files: its database's and the audit log (rotated copies too)."""
    return entry.startswith((_OWN_PREFIX, AUDIT_FILE))


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL; None for other databases (or no file at all)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None  # reported as a malformed URL by whoever opens it
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:":
        return None
    if name.startswith("file:"):
        return None  # a URI filename: SQLite's to interpret
    return Path(name).resolve()


def keep_private(path: Path, owner: str | None = None) -> None:
    """Warn when others may use ``path``; take their access away unless ``owner`` says why
    the file is not the gateway's to change."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & _OTHERS:
        return
    private = mode & ~_OTHERS
    if owner is None:
        path.chmod(private)
        log.warning(
            "%s was open to other users (mode %s): changed to %s", path, oct(mode), oct(private)
        )
    else:
        log.warning(
            "%s is open to other users (mode %s) and left so (%s): run chmod %s %s",
            path,
            oct(mode),
            owner,
            oct(private)[2:],
            path,
        )


def _create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 unless it exists (SQLite takes an empty file as a new
    database, and gives its side files the same mode)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass  # there already, or another worker was first

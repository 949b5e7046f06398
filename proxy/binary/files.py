"""The kept binaries: one file per binary download, one row per file, published atomically.

A download is written to a temporary file beside its final name (``<digest>.part-<host>-<pid>-
<random>``, created exclusively, mode 0600) while it is relayed; only :meth:`Fill.commit`, after
validation, fsyncs it, reads its sha256 back from the disk, renames it into place
(``os.replace``) and then writes the row. A crash or ``kill -9`` at any moment leaves a ``.part``
file (never served: nothing names it) or a complete file without a row (never served either);
:meth:`BinaryStore.sweep_leftovers` removes both at start.

Layout: ``<binary_dir>/<d[0:2]>/<d[2:4]>/<digest>-<sha256[:16]>``, ``digest`` being the request's
cache key (:class:`proxy.cache.policy.CacheKey`). The content hash in the name means a file never
changes once published: a second download of the same key (NBIA zips differ byte for byte between
fetches) gets a new name, the row moves to it, the old file goes (the same bytes again keep their
file). A reader that looked the row up opens either the bytes the row describes or nothing, never
another fill's bytes.

Several replicas may share ``binary_dir`` and one PostgreSQL database (never SQLite: its WAL does
not work over a network file system): renames publish, rows are written after the file exists and
deleted only while they still name the same file (a conditional delete), so one replica never drops
another's newer row. What is being read or filled is known per process only: another replica may
evict a file this one is reading. On a local file system (and on NFS from the same client) the open
file stays readable until closed; NFS across clients may give ``ESTALE`` to the reader, which then
aborts its transfer. On NFS, mount with ``lookupcache=positive`` (or ``none``): a cached "no such
file" would make a replica drop the row of a file another replica has just published (a lost entry,
never wrong bytes).

Two replicas committing the same key at once both publish; the row ends up naming one file
and the other is an orphan until a sweep (safe to run at any time, not only at start).

Blocking I/O throughout (file system and database), and the store is thread-safe. Whatever
touches the database or fsyncs (:meth:`BinaryStore.lookup`, :meth:`Fill.commit`, the sweep,
eviction) belongs in a thread (``asyncio.to_thread``), never on the event loop;
:meth:`Fill.append` writes through :mod:`proxy.binary.appender` (past the page cache where the
file system allows), batched per thread hop by the caller. Writes are rare (one row per download)
and small, so unlike the metadata cache there is no writer thread; the served times are batched
(:meth:`BinaryStore.touch`). Failures to write (a full disk, a directory that is not writable,
the database) never raise into the relay: the fill turns broken, the store counts it and logs it
once (then once a minute with a count), and the download goes on uncached.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from proxy.binary.appender import Appender
from proxy.binary.disk import Stopped, sha256_of
from proxy.binary.ranges import etag_for
from proxy.binary.tables import BinaryFile, BinaryTag
from proxy.cache.policy import CacheKey, glob_to_like
from proxy.cache.store import ENVIRONMENT_ERRORS, storable
from proxy.cache.writer import FailureLog
from proxy.config import Settings
from proxy.db import describe_failure, is_unreachable, upsert_insert
from proxy.store_health import StoreHealth

log = logging.getLogger("nbia_proxy.binary")

#: How a kept file was checked before it was published.
VALIDATIONS = ("full", "self", "none")
#: A ``.part`` file untouched this long is a leftover whatever wrote it (a live fill writes far
#: more often: the upstream read timeout is two minutes); so is a file without a row.
STALE_SECONDS = 3600.0
#: Free space kept at start: 1 GiB, or 5 % of a disk smaller than 20 GiB.
MARGIN_BYTES = 1024**3
MARGIN_SHARE = 0.05

_PART = ".part-"
#: Made in ``binary_dir`` when the store starts on an empty database. Without it, a directory is
#: not the one the rows describe (a shared volume not mounted, an empty mount point): rows are
#: then never dropped as "file gone" nor files swept as "no row".
MARKER = ".nbia-proxy-binaries"
_HASH_CHARS = 16  # of the sha256 in a file name: enough to tell two fetches of one key apart
_NAME = re.compile(r"([0-9a-f]{64})-([0-9a-f]{16})")
_TOUCH_SECONDS = 5.0
_tokens = itertools.count()  # tells open readers and fills apart in the busy registry
# Temporary files of this process's fills, whichever store opened them.
_LIVE_TEMPS: set[Path] = set()
_LIVE_LOCK = threading.Lock()


def directory_for(settings: Settings) -> Path:
    """Where kept binaries live: ``binary_dir``, or ``binaries`` in the data dir."""
    return settings.binary_dir or settings.data_dir / "binaries"


def _limit(column: Any) -> int | None:
    return getattr(column.type, "length", None)


_UPSTREAM, _IDENTITY, _METHOD, _ENDPOINT, _TYPE = (
    _limit(column)
    for column in (
        BinaryFile.upstream,
        BinaryFile.identity,
        BinaryFile.method,
        BinaryFile.endpoint,
        BinaryFile.content_type,
    )
)
_TAG_KIND, _TAG_VALUE = _limit(BinaryTag.kind), _limit(BinaryTag.value)


@dataclass(frozen=True, slots=True)
class Meta:
    """What the relay learnt about a download, stored with it."""

    content_type: str
    content_disposition: str = ""
    validation: str = "none"

    def __post_init__(self) -> None:
        if self.validation not in VALIDATIONS:
            raise ValueError(f"validation must be one of {', '.join(VALIDATIONS)}")


@dataclass(frozen=True, slots=True)
class Kept:
    """A published file and its row."""

    digest: str
    path: Path
    size: int
    sha256: str
    content_type: str
    content_disposition: str
    validation: str
    fetched_at: float
    last_used_at: float

    @property
    def etag(self) -> bytes:
        """The strong ETag: the file's sha256."""
        return etag_for(self.sha256)


@dataclass(frozen=True, slots=True)
class Swept:
    """What :meth:`BinaryStore.sweep_leftovers` removed."""

    parts: int = 0  # temporary files of fills that died
    orphans: int = 0  # complete files no row names
    rows: int = 0  # rows whose file is gone


@dataclass(slots=True)
class Counters:
    """What the store did since start, for the stats (per process)."""

    write_failures: int = 0  # fills that could not be kept: disk full, not writable, database
    too_large: int = 0  # fills larger than the cap, relayed without being kept
    no_room: int = 0  # fills that did not fit: what had to go was being read or filled
    evicted: int = 0
    dropped: int = 0  # rows found without their file (or with a file of the wrong size)
    last_failure: str | None = None


@dataclass(frozen=True, slots=True)
class BinaryStats:
    """The kept binaries (all replicas) and this process's counters."""

    files: int
    bytes: int
    max_bytes: int
    counters: Counters


@dataclass(frozen=True, slots=True)
class Verified:
    """What :meth:`BinaryStore.verify` found."""

    checked: int
    damaged: int  # bytes that no longer hash to the row's sha256
    missing: int  # rows whose file is gone
    removed: int  # rows removed (another replica may have replaced some meanwhile)


class Fill:
    """A download being kept: write its chunks, then commit or discard it.

    Never raises from :meth:`write` or :meth:`commit`: when the file cannot be written it turns
    :attr:`broken` (the temporary file is removed at once) and the relay carries on.
    """

    def __init__(
        self, store: BinaryStore, key: CacheKey, temp: Path | None, file: Appender | None
    ) -> None:
        self.key = key
        self.temp = temp
        self.size = 0
        self.broken: str | None = None if temp is not None else "not opened"
        self._store = store
        self._file = file
        self._done = temp is None
        self._stopping = threading.Event()
        self.token = next(_tokens)
        # The descriptor's owner: the writer's thread, the commit's and a discard's (from
        # another thread, when the fill is stopped) take turns, so it is never closed under a
        # write or an fsync, nor twice (its number may be another file's by then).
        self._lock = threading.RLock()

    def write(self, chunk: bytes) -> None:
        """Append ``chunk`` (ignored once broken or done)."""
        self.append([chunk])

    @property
    def on_disk(self) -> int:
        """Bytes another descriptor can read from the temporary file (the appender stages the
        rest until a whole buffer is there)."""
        return self._file.on_disk if self._file is not None else 0

    def append(self, chunks: list[bytes]) -> None:
        """Append ``chunks`` to the file, in as few system calls as the appender needs (ignored
        once broken or done)."""
        with self._lock:
            self._append(chunks)

    def _append(self, chunks: list[bytes]) -> None:
        if self._done or self.broken is not None or self._file is None:
            return
        count = sum(len(chunk) for chunk in chunks)
        if self.size + count > self._store.max_bytes:
            self._store._count_too_large()
            self._give_up("larger than binary_cache_max_bytes")
            return
        try:
            self._file.append(chunks)
        except OSError as exc:
            self._store._write_failed(exc)
            self._give_up(describe_failure(exc))
            return
        self.size += count

    def stop_commit(self) -> None:
        """Make a commit in progress (in another thread) give up at the next MiB it reads back:
        the gateway is stopping, and a multi-GB file's sha256 would hold the stop up."""
        self._stopping.set()

    def commit(self, meta: Meta) -> Kept | None:
        """Publish the file under its final name and record it; None when it is not kept."""
        with self._lock:  # a discard meanwhile waits, then finds the fill done
            return self._commit(meta)

    def _commit(self, meta: Meta) -> Kept | None:
        if self._done or self.broken is not None or self.temp is None or self._file is None:
            self._release()
            return None
        try:
            self._file.finish()
            os.fsync(self._file.fd)
            file, self._file = self._file, None
            file.close()
            # The sha256 (the file's name and ETag) is read back from the disk here, after the
            # verdict let every reader have its last byte, not hashed on the way in: on two
            # cores the hash (0.6 s of CPU per GB) was a third of the fill's CPU, and taking it
            # off the download made the cold 1 GB download 1.4 to 1.6 times faster
            # (bench.series_cache). And the name is that of the bytes on the disk.
            if _size(self.temp) != self.size:
                raise OSError(errno.EIO, "the file on disk is not the size of the download")
            sha256 = sha256_of(self.temp, direct=self._store.direct_writes, stop=self._stopping)
            if sha256 is None:
                raise FileNotFoundError(errno.ENOENT, "the file went away", str(self.temp))
        except Stopped:
            self._give_up("stopped while it was kept")
            return None
        except OSError as exc:
            self._store._write_failed(exc)
            self._give_up(describe_failure(exc))
            return None
        final = self._store.path_for(self.key.digest, sha256)
        # Room, rename and row as one step per process, or two commits could both find the
        # same room free (across replicas the cap may be overshot by what commits at the same
        # moment, until the next commit evicts).
        with self._store._commit_lock:
            try:
                if not self._store.make_room(self.size, keep=self.key.digest):
                    self._store._count_no_room()
                    self._give_up("no room under binary_cache_max_bytes")
                    return None
                # The name holds the content hash: a file already there has these very bytes
                # (an unchanged DICOM fetched again), and readers may have it open.
                published = _size(final) != self.size
                if published:
                    os.replace(self.temp, final)
                    _fsync_dir(final.parent)
                else:
                    self.temp.unlink()
            except Exception as exc:  # noqa: BLE001 -- disk or database: the relay goes on
                self._store._write_failed(exc)
                self._give_up(describe_failure(exc))
                return None
            self._done = True
            kept = self._store._record(self.key, final, self.size, sha256, meta, published)
        self._release()
        return kept

    def discard(self) -> None:
        """Throw the bytes away (the download failed or did not validate)."""
        self._give_up("discarded")

    def __enter__(self) -> Fill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.discard()

    def _give_up(self, reason: str) -> None:
        with self._lock:
            self._give_up_owned(reason)

    def _give_up_owned(self, reason: str) -> None:
        self.broken = self.broken or reason
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
        if not self._done and self.temp is not None:
            try:
                self.temp.unlink()
            except OSError:
                pass  # swept at the next start
        self._done = True
        self._release()

    def _release(self) -> None:
        self._store._unbusy(self.key.digest, self.token, self.temp)


class Reading:
    """An open kept file, protected from eviction in this process until closed."""

    def __init__(self, store: BinaryStore, kept: Kept, file: BinaryIO) -> None:
        self.kept = kept
        self.file = file
        self._store = store
        self._closed = False
        self.token = next(_tokens)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.file.close()
            self._store._unbusy(self.kept.digest, self.token)

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(slots=True)
class _Busy:
    holders: set[int] = field(default_factory=set)


class BinaryStore:
    """Kept binaries in ``directory``, their rows in the database behind ``engine``."""

    def __init__(
        self,
        engine: Engine,
        directory: Path,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
        host: str | None = None,
        direct_writes: bool = True,
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.max_bytes = max_bytes
        #: Fills write past the page cache where the filesystem allows (binary_direct_writes).
        self.direct_writes = direct_writes
        self.counters = Counters()
        self._clock = clock
        self._host = _safe_host(host if host is not None else socket.gethostname())
        self._insert: Callable[..., Any] = upsert_insert(engine)
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._busy: dict[str, _Busy] = {}  # digest -> open readers and fills (this process)
        self._touched: dict[str, float] = {}
        self._touched_at = clock()
        #: The database's state (shared with the metadata cache when the gateway builds it):
        #: while it is unreachable, lookups are misses and downloads are relayed, not kept.
        self.health = StoreHealth()
        self._write_log = FailureLog("binary cache cannot write, downloads are relayed", clock)
        self._read_log = FailureLog("binary cache cannot read its database", clock)

    # start-up ---------------------------------------------------------------------------------

    def start(self) -> Swept:
        """Create the directory (0700), sweep leftovers, lower the cap to what the disk holds."""
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self.directory.mkdir(mode=0o700, exist_ok=True)
            kept = self.total_bytes()
            if not self._marked() and not kept:
                (self.directory / MARKER).touch(mode=0o600)
            if self._marked():
                swept = self.sweep_leftovers()
            else:
                swept = Swept()
                log.warning(
                    "binary cache: %s has no %s but the database names %s of kept files: "
                    "is the volume mounted? Nothing is swept, files not found are misses "
                    "(if they were deleted on purpose, create that file)",
                    self.directory,
                    MARKER,
                    _human(kept),
                )
        except ENVIRONMENT_ERRORS as exc:
            self._write_failed(exc)
            return Swept()
        configured = self.max_bytes
        self.max_bytes = capped_max_bytes(configured, self.directory, kept)
        if self.max_bytes < configured:
            log.warning(
                "binary cache in %s: %s cap (binary_cache_max_bytes %s is more than the disk "
                "can hold beside %s kept)",
                self.directory,
                _human(self.max_bytes),
                _human(configured),
                _human(kept),
            )
        else:
            log.info("binary cache in %s: %s cap", self.directory, _human(self.max_bytes))
        return swept

    def sweep_leftovers(self, stale_seconds: float = STALE_SECONDS) -> Swept:
        """Remove what interrupted fills left: ``.part`` files whose process is gone (this
        host) or that nothing wrote to for ``stale_seconds`` (any host: the directory may be
        shared), complete files no row names (after ``stale_seconds``: another replica may be
        between its rename and its row), and rows whose file is gone."""
        if not self._marked():
            return Swept()  # not the directory the rows describe: see MARKER
        now = self._clock()
        rows = self._rows()
        named = {self.path_for(digest, sha256) for digest, sha256 in rows}
        parts = orphans = 0
        with _LIVE_LOCK:
            own = set(_LIVE_TEMPS)  # fills of this process are never swept, whatever their age
        for path in self._files():
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if _PART in path.name:
                if path not in own and (age > stale_seconds or self._dead_fill(path)):
                    parts += _unlink(path)
            elif _NAME.fullmatch(path.name) and path not in named and age > stale_seconds:
                orphans += _unlink(path)
        dropped = self._lost([(d, s) for d, s in rows if not self.path_for(d, s).exists()])
        if parts or orphans or dropped:
            log.info(
                "binary cache: swept %d unfinished downloads, %d files without a row and %d "
                "rows without a file",
                parts,
                orphans,
                dropped,
            )
        return Swept(parts, orphans, dropped)

    # reads -----------------------------------------------------------------------------------

    def path_for(self, digest: str, sha256: str) -> Path:
        """The final name of the file with these bytes for this key."""
        return self._folder(digest) / f"{digest}-{sha256[:_HASH_CHARS]}"

    def _folder(self, digest: str) -> Path:
        return self.directory / digest[:2] / digest[2:4]

    def _make_folder(self, folder: Path) -> None:
        # Level by level: mkdir(parents=True) would give the levels above the default mode.
        for level in (self.directory, folder.parent, folder):
            try:
                level.mkdir(mode=0o700)
            except FileExistsError:
                pass

    def lookup(self, digest: str) -> Kept | None:
        """The kept file for a key, if its row and its file (of the right size) are there.

        A row whose file is gone or has the wrong size is dropped (and such a file removed).
        """
        if self.health.skipping("binary_lookup"):
            return None  # relayed: a kept file is never served without its row
        try:
            with self.engine.connect() as connection:
                row = connection.execute(
                    select(BinaryFile).where(BinaryFile.digest == digest)
                ).first()
        except ENVIRONMENT_ERRORS as exc:
            if is_unreachable(exc):
                self.health.failed("binary_lookup", exc)
            else:
                self._read_log.failed(describe_failure(exc))
            return None
        self.health.succeeded()
        if row is None:
            return None
        path = self.path_for(digest, row.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:  # not "gone": unreadable for now (permissions, a sick volume)
            self._read_log.failed(describe_failure(exc))
            return None
        if size != row.size:
            # Gone, or damaged (a published file never changes): the row and any file go.
            self._lost([(digest, row.sha256)])
            return None
        return Kept(
            digest=digest,
            path=path,
            size=row.size,
            sha256=row.sha256,
            content_type=row.content_type,
            content_disposition=row.content_disposition,
            validation=row.validation,
            fetched_at=row.fetched_at,
            last_used_at=row.last_used_at,
        )

    def open_read(self, kept: Kept) -> Reading | None:
        """Open a kept file for serving (and record it as used); None when it is gone."""
        try:
            file = kept.path.open("rb", buffering=0)
        except FileNotFoundError:
            self._lost([(kept.digest, kept.sha256)])
            return None
        except OSError as exc:  # out of descriptors, permissions: a miss, the row stays
            self._read_log.failed(describe_failure(exc))
            return None
        reading = Reading(self, kept, file)
        with self._lock:
            self._busy.setdefault(kept.digest, _Busy()).holders.add(reading.token)
        if os.fstat(file.fileno()).st_size != kept.size:
            reading.close()
            self._lost([(kept.digest, kept.sha256)])
            return None
        self.touch(kept)
        return reading

    def total_bytes(self) -> int:
        """Bytes kept, all replicas together (from the database)."""
        with Session(self.engine) as session:
            return int(session.scalar(select(func.coalesce(func.sum(BinaryFile.size), 0))) or 0)

    def stats(self) -> BinaryStats:
        with Session(self.engine) as session:
            files, size = session.execute(
                select(func.count(), func.coalesce(func.sum(BinaryFile.size), 0))
            ).one()
        return BinaryStats(int(files), int(size), self.max_bytes, self.counters)

    # writes ----------------------------------------------------------------------------------

    def open_fill(self, key: CacheKey, expected_size: int | None = None) -> Fill:
        """Start keeping a download for ``key``; the fill is broken at once if the directory
        cannot take it (the relay goes on regardless).

        With ``expected_size`` (a Content-Length, NBIA's getSeriesSize), room is made before
        the first byte, so the download does not fill the disk on its way; a download that
        cannot fit under the cap is not written at all. Fills in flight are not counted in the
        total until they are committed (each is held under the cap by itself).
        """
        if self.health.skipping("binary_commit"):
            # Its row could not be written: relayed without keeping a file nothing would name.
            fill = Fill(self, key, None, None)
            fill.broken = f"database unreachable: {self.health.reason}"
            return fill
        try:
            room = expected_size is None or self.make_room(expected_size, keep=key.digest)
        except ENVIRONMENT_ERRORS as exc:
            self._write_failed(exc)
            fill = Fill(self, key, None, None)
            fill.broken = describe_failure(exc)
            return fill
        if not room:
            assert expected_size is not None
            fill = Fill(self, key, None, None)
            if expected_size > self.max_bytes:
                self._count_too_large()
                fill.broken = "larger than binary_cache_max_bytes"
            else:
                self._count_no_room()
                fill.broken = "no room under binary_cache_max_bytes"
            return fill
        folder = self._folder(key.digest)
        temp = folder / f"{key.digest}{_PART}{self._host}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._make_folder(folder)
            file = Appender.create(temp, direct=self.direct_writes)
        except OSError as exc:
            self._write_failed(exc)
            fill = Fill(self, key, None, None)
            fill.broken = describe_failure(exc)
            return fill
        fill = Fill(self, key, temp, file)
        with self._lock:
            self._busy.setdefault(key.digest, _Busy()).holders.add(fill.token)
        with _LIVE_LOCK:
            _LIVE_TEMPS.add(temp)
        return fill

    def close(self) -> None:
        """Write what is pending (served times); call when the gateway stops."""
        self.flush()

    def touch(self, kept: Kept) -> None:
        """Record that ``kept`` was served; written in batches every few seconds."""
        now = self._clock()
        with self._lock:
            self._touched[kept.digest] = now
            due = now - self._touched_at >= _TOUCH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the served times gathered so far."""
        with self._lock:
            touched, self._touched = self._touched, {}
            self._touched_at = self._clock()
        if not touched:
            return
        try:
            with Session(self.engine) as session, session.begin():
                for digest, when in touched.items():
                    session.execute(
                        update(BinaryFile)
                        .where(BinaryFile.digest == digest, BinaryFile.last_used_at < when)
                        .values(last_used_at=when)
                    )
        except ENVIRONMENT_ERRORS as exc:
            self._write_failed(exc)

    def remove(self, digest: str) -> bool:
        """Forget a key's file (a purge); True when there was one."""
        with Session(self.engine) as session:
            sha256 = session.scalar(select(BinaryFile.sha256).where(BinaryFile.digest == digest))
        return sha256 is not None and self._drop([(digest, sha256)]) == 1

    def purge(
        self,
        *,
        pattern: str | None = None,
        collection: str | None = None,
        series: str | None = None,
        collection_series: Iterable[str] = (),
    ) -> tuple[int, int]:
        """Remove matching files (all without filters); return (files, bytes).

        ``collection`` matches the files whose request named it, and those naming one of
        ``collection_series`` (its series, as far as the caller knows them): a series download
        names only its series.
        """
        query = select(BinaryFile.digest, BinaryFile.sha256, BinaryFile.size)
        if pattern:
            like = glob_to_like(storable(pattern))
            query = query.where(BinaryFile.endpoint.like(like, escape="\\"))
        if collection:
            query = query.where(_in_collection(collection, collection_series))
        if series:
            tagged = select(BinaryTag.digest).where(
                BinaryTag.kind == "series", BinaryTag.value == storable(series)
            )
            query = query.where(BinaryFile.digest.in_(tagged))
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        dropped = self._drop([(row.digest, row.sha256) for row in rows])
        return dropped, sum(row.size for row in rows)

    def without_collection(self, known_series: Iterable[str] = ()) -> int:
        """Kept files whose collection is unknown: their request named no collection and
        none of ``known_series`` (the series whose collection the caller knows)."""
        known = select(BinaryTag.digest).where(
            or_(
                BinaryTag.kind == "collection",
                and_(
                    BinaryTag.kind == "series",
                    BinaryTag.value.in_(sorted({storable(uid) for uid in known_series})),
                ),
            )
        )
        with Session(self.engine) as session:
            query = select(func.count()).where(BinaryFile.digest.not_in(known))
            return int(session.scalar(query.select_from(BinaryFile)) or 0)

    def verify(
        self, *, collection: str | None = None, collection_series: Iterable[str] = ()
    ) -> Verified:
        """Hash every kept file (or those of ``collection``, as in :meth:`purge`) again and
        remove those whose bytes no longer match their row's sha256, or that are gone."""
        query = select(BinaryFile.digest, BinaryFile.sha256, BinaryFile.size)
        if collection:
            query = query.where(_in_collection(collection, collection_series))
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        bad: list[tuple[str, str]] = []
        missing = checked = 0
        for row in rows:
            found = sha256_of(self.path_for(row.digest, row.sha256), direct=self.direct_writes)
            checked += 1
            if found is None:
                missing += 1
                bad.append((row.digest, row.sha256))
            elif found != row.sha256:
                bad.append((row.digest, row.sha256))
        removed = self._drop(bad)
        return Verified(checked, len(bad) - missing, missing, removed)

    def make_room(self, size: int, keep: str | None = None) -> bool:
        """Evict least recently used files until ``size`` more bytes fit under the cap; never
        a file being read or filled here, nor ``keep`` (the key being replaced). False when
        they cannot fit."""
        if size > self.max_bytes:
            return False
        self.flush()  # the order of eviction is the order of use
        with Session(self.engine) as session:
            query = select(func.coalesce(func.sum(BinaryFile.size), 0))
            if keep is not None:
                query = query.where(BinaryFile.digest != keep)
            total = int(session.scalar(query) or 0)
            if total + size <= self.max_bytes:
                return True
            oldest = session.execute(
                select(BinaryFile.digest, BinaryFile.sha256, BinaryFile.size).order_by(
                    BinaryFile.last_used_at
                )
            ).all()
        with self._lock:
            busy = {digest for digest, entry in self._busy.items() if entry.holders}
        doomed = []
        for row in oldest:
            if total + size <= self.max_bytes:
                break
            if row.digest in busy or row.digest == keep:
                continue
            doomed.append((row.digest, row.sha256))
            total -= row.size
        evicted = self._drop(doomed)
        with self._lock:
            self.counters.evicted += evicted
        return total + size <= self.max_bytes

    # internals -------------------------------------------------------------------------------

    def _record(
        self, key: CacheKey, path: Path, size: int, sha256: str, meta: Meta, published: bool
    ) -> Kept | None:
        now = self._clock()
        content_type = storable(meta.content_type, _TYPE)
        disposition = storable(meta.content_disposition)
        values: dict[str, Any] = {
            "digest": key.digest,
            "upstream": storable(key.upstream, _UPSTREAM),
            "identity": storable(key.identity, _IDENTITY),
            "method": storable(key.method, _METHOD),
            "endpoint": storable(key.endpoint, _ENDPOINT),
            "params": storable(key.params),
            "size": size,
            "sha256": sha256,
            "content_type": content_type,
            "content_disposition": disposition,
            "validation": meta.validation,
            "fetched_at": now,
            "last_used_at": now,
        }
        tags = sorted({(storable(k, _TAG_KIND), storable(v, _TAG_VALUE)) for k, v in key.tags})
        try:
            with Session(self.engine) as session, session.begin():
                old = session.scalar(
                    select(BinaryFile.sha256).where(BinaryFile.digest == key.digest)
                )
                statement = self._insert(BinaryFile).values(**values)
                changed = {k: v for k, v in values.items() if k != "digest"}
                session.execute(
                    statement.on_conflict_do_update(index_elements=["digest"], set_=changed)
                )
                session.execute(delete(BinaryTag).where(BinaryTag.digest == key.digest))
                if tags:
                    # Another replica committing the same key may have written them meanwhile.
                    rows = [{"digest": key.digest, "kind": k, "value": v} for k, v in tags]
                    session.execute(self._insert(BinaryTag).values(rows).on_conflict_do_nothing())
        except Exception as exc:  # noqa: BLE001 -- any refusal: the download was relayed anyway
            self._write_failed(exc)
            if published:
                _unlink(path)  # nothing names it (a file that was there may be a row's)
            return None
        if old is not None and old != sha256:
            _unlink(self.path_for(key.digest, old))  # its readers keep their open file
        self._write_log.succeeded()
        self.health.succeeded()
        return Kept(
            digest=key.digest,
            path=path,
            size=size,
            sha256=sha256,
            content_type=content_type,
            content_disposition=disposition,
            validation=meta.validation,
            fetched_at=now,
            last_used_at=now,
        )

    def _drop(self, files: Iterable[tuple[str, str]]) -> int:
        """Delete rows that still name these files, then the files; return rows deleted."""
        files = list(files)
        if not files:
            return 0
        deleted = 0
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(files), 200):
                chunk = files[start : start + 200]
                # Only while the row still names this file: another replica may have moved it.
                match = or_(
                    *(and_(BinaryFile.digest == d, BinaryFile.sha256 == s) for d, s in chunk)
                )
                digests = list(session.scalars(select(BinaryFile.digest).where(match)))
                if not digests:
                    continue
                session.execute(delete(BinaryTag).where(BinaryTag.digest.in_(digests)))
                session.execute(delete(BinaryFile).where(match))
                deleted += len(digests)
        for digest, sha256 in files:
            _unlink(self.path_for(digest, sha256))
        return deleted

    def _lost(self, files: list[tuple[str, str]]) -> int:
        """Drop rows found without their file (or with a damaged one), counted; none while the
        directory lacks its marker (a volume not mounted: its files are not gone)."""
        if not files:
            return 0
        if not self._marked():
            self._read_log.failed(f"{self.directory} has no {MARKER} (not mounted?)")
            return 0
        try:
            dropped = self._drop(files)
        except ENVIRONMENT_ERRORS as exc:
            self._write_failed(exc)
            return 0
        with self._lock:
            self.counters.dropped += dropped
        return dropped

    def mounted(self) -> bool:
        """Whether ``directory`` is the one the rows describe (it has its marker file)."""
        return self._marked()

    def _marked(self) -> bool:
        return (self.directory / MARKER).exists()

    def _rows(self) -> list[tuple[str, str]]:
        with Session(self.engine) as session:
            return [
                (r.digest, r.sha256)
                for r in session.execute(select(BinaryFile.digest, BinaryFile.sha256))
            ]

    def _files(self) -> Iterable[Path]:
        for first in _subdirs(self.directory):
            for second in _subdirs(first):
                yield from (path for path in second.iterdir() if path.is_file())

    def _dead_fill(self, path: Path) -> bool:
        """Whether a ``.part`` file was written by a process of this host that is gone."""
        host, pid_text = _split_part(path.name.partition(_PART)[2])
        if host != self._host or pid_text is None:
            return False
        pid = int(pid_text)
        if pid == os.getpid():
            # Not one of our live fills (the caller checked): an earlier process with our pid
            # left it, as a container's gateway, always pid 1 on the same host name, does.
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def _unbusy(self, digest: str, holder: int, temp: Path | None = None) -> None:
        with _LIVE_LOCK:
            _LIVE_TEMPS.discard(temp)
        with self._lock:
            entry = self._busy.get(digest)
            if entry is None:
                return
            entry.holders.discard(holder)
            if not entry.holders:
                del self._busy[digest]

    def _write_failed(self, exc: BaseException) -> None:
        reason = describe_failure(exc)
        with self._lock:
            self.counters.write_failures += 1
            self.counters.last_failure = reason
        if is_unreachable(exc):
            self.health.failed("binary_commit", exc)  # one line per outage, for every path
        else:
            self._write_log.failed(reason)

    def _count_too_large(self) -> None:
        with self._lock:
            self.counters.too_large += 1

    def _count_no_room(self) -> None:
        with self._lock:
            self.counters.no_room += 1


def capped_max_bytes(configured: int, directory: Path, kept_bytes: int) -> int:
    """``configured``, lowered to what the disk of ``directory`` can hold: the bytes already
    kept plus its free space, less a margin (1 GiB, or 5 % of a disk smaller than 20 GiB)."""
    status = os.statvfs(directory)
    free = status.f_bavail * status.f_frsize
    margin = min(MARGIN_BYTES, int(status.f_blocks * status.f_frsize * MARGIN_SHARE))
    return max(0, min(configured, kept_bytes + free - margin))


def _split_part(tail: str) -> tuple[str, str | None]:
    """``(host, pid)`` of a temporary name's ``<host>-<pid>-<random>`` tail."""
    head, _, _random = tail.rpartition("-")
    host, _, pid = head.rpartition("-")
    return host, pid if pid.isdigit() else None


def _safe_host(name: str) -> str:
    # The host goes into file names and is split off at the last dashes: no dashes in it.
    return re.sub(r"[^A-Za-z0-9.]", "_", name)[:64] or "host"


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _in_collection(collection: str, series: Iterable[str]) -> Any:
    """Files whose request named ``collection`` or one of its ``series``."""
    uids = sorted({storable(uid) for uid in series})
    tagged = select(BinaryTag.digest).where(
        or_(
            and_(BinaryTag.kind == "collection", BinaryTag.value == storable(collection)),
            and_(BinaryTag.kind == "series", BinaryTag.value.in_(uids)),
        )
    )
    return BinaryFile.digest.in_(tagged)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [entry for entry in path.iterdir() if entry.is_dir() and len(entry.name) == 2]
    except FileNotFoundError:
        return []


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("binary cache: cannot remove %s: %s", path, describe_failure(exc))
        return 0
    return 1


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the file is in place either way; only its durability across a crash is at stake
    finally:
        os.close(fd)


def _human(size: int) -> str:
    """``size`` in decimal units, as disks are sold (``50.0 GB``)."""
    if size < 1000:
        return f"{size} B"
    amount = float(size)
    for unit in ("KB", "MB", "GB", "TB"):
        amount /= 1000
        if amount < 1000 or unit == "TB":
            break
    return f"{amount:.1f} {unit}"

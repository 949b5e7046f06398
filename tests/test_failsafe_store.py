"""The cache store fails safe: stale reads, entries the database cannot take, a full disk.

The interleavings are forced with events (a store whose reads wait, a writer held by a job),
never waited for. The full disk is a real one (a small tmpfs) where the machine lets a test
mount it, and SQLite's own "database or disk is full" (``max_page_count``) everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, event, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import proxy.db
from proxy.cache.policy import CacheKey
from proxy.cache.store import CacheStore, Entry, Stored
from proxy.cache.tables import CacheEntry, CacheTag
from proxy.cache.tiers import CacheSettings, TieredCache
from proxy.db import SQLITE_FILE, make_engine, migrate
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.gateway_server import Clock, GatewayServer, make_settings, request_line, send_raw

NOW = 1_800_000_000.0
S = "/nbia-api/services"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        migrate(url)
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def tiered(
    url: str, clock: Clock, recheck_seconds: float = 5.0, min_free_disk_bytes: int = 0
) -> TieredCache:
    settings = CacheSettings(
        max_bytes=1 << 30,
        memory_bytes=1 << 24,
        recheck_seconds=recheck_seconds,
        keep_expired_seconds=86400.0,
        min_free_disk_bytes=min_free_disk_bytes,
    )
    return TieredCache(CacheStore(make_engine(url)), settings, clock)


def series_key(collection: str) -> CacheKey:
    """A key as the gateway makes one for ``GET v4/getSeries?Collection=...`` (built here, so
    these tests do not depend on how keys are made)."""
    params = f"Collection={collection}"
    digest = hashlib.sha256(f"nbia\nanonymous\nGET\nv4/getSeries\n{params}".encode()).hexdigest()
    tags = frozenset({("collection", collection)})
    return CacheKey(digest, "nbia", "anonymous", "GET", "v4/getSeries", params, tags)


def answer(key: CacheKey, body: bytes = b"[]", at: float = NOW) -> Entry:
    headers = [(b"content-type", b"application/json")]
    return Entry(key.digest, key.endpoint, 200, headers, body, at, at + 3600)


class HeldReads:
    """Wraps ``store.get``: each read runs at once, but hands its result back only when told."""

    def __init__(self, store: CacheStore) -> None:
        self._get = store.get
        self.read = threading.Event()
        self.release = threading.Event()
        store.get = self  # type: ignore[method-assign]

    def __call__(self, digest: str) -> Entry | None:
        entry = self._get(digest)
        self.read.set()
        assert self.release.wait(30)
        return entry


# --- item 11: a stale database miss never drops a newer memory copy --------------------------


def test_a_miss_read_before_the_commit_keeps_the_copy_stored_meanwhile(
    db_url: str, clock: Clock
) -> None:
    # A request looks up a cold key; while its database read is out, the flight for that key
    # lands (memory copy), the writer commits it, and only then does the read report its miss.
    cache = tiered(db_url, clock)
    cache.start()
    key = series_key("TCGA-KIRC")
    entry = answer(key)
    held = HeldReads(cache.store)

    async def scenario() -> Entry | None:
        late = asyncio.ensure_future(cache.lookup(key.digest))
        assert await asyncio.to_thread(held.read.wait, 30)  # the read has missed
        cache.store_entry(key, entry)
        await asyncio.to_thread(cache.writer.flush)  # committed, and the writer has said so
        held.release.set()
        return await late

    try:
        assert asyncio.run(scenario()) is entry
        assert cache.from_memory(key.digest) is entry  # and it stays, for the next request
    finally:
        cache.close()


def test_a_miss_read_after_the_commit_drops_a_copy_purged_elsewhere(
    db_url: str, clock: Clock
) -> None:
    cache = tiered(db_url, clock, recheck_seconds=5.0)
    cache.start()
    key = series_key("TCGA-KIRC")
    other_process = CacheStore(make_engine(db_url))

    async def scenario() -> tuple[Entry | None, Entry | None]:
        cache.store_entry(key, answer(key))
        await asyncio.to_thread(cache.writer.flush)
        first = await cache.lookup(key.digest)  # from memory
        await asyncio.to_thread(other_process.purge)
        clock.advance(6)  # past the recheck: the next look-up asks the database
        return first, await cache.lookup(key.digest)

    try:
        first, second = asyncio.run(scenario())
        assert first is not None and second is None
        assert cache.from_memory(key.digest) is None
    finally:
        cache.close()
        other_process.engine.dispose()


def test_an_unwritten_copy_survives_a_database_miss(db_url: str, clock: Clock) -> None:
    # The writer has not stored it (queued, or its write failed): the database cannot speak
    # for it, however late the read.
    cache = tiered(db_url, clock)  # not started: nothing is ever written
    key = series_key("TCGA-KIRC")
    entry = answer(key)

    async def scenario() -> Entry | None:
        cache.store_entry(key, entry)
        clock.advance(6)
        return await cache.lookup(key.digest)

    try:
        assert asyncio.run(scenario()) is entry
    finally:
        cache._readers.shutdown()
        cache.store.engine.dispose()


# --- item 12: undecodable bytes never cost a batch, a refused entry only itself ---------------


def form_post(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


#: Requests whose parameters are not UTF-8 (raw or percent-encoded) or hold a NUL, as sent.
UNDECODABLE = [
    request_line("GET", f"{S}/v4/getSeries?Collection=%FF"),
    request_line("GET", f"{S}/v4/getSeries?Collection=TCGA%C3%28"),
    request_line("GET", f"{S}/v4/getSeries?Collection=%00"),
    form_post(f"{S}/v4/getSeriesMetadata", b"list=1.2.3,\xff\xfe"),
    form_post(f"{S}/v4/getSeriesMetadata", b"list=1.2.%FF"),
]


def held_writer(cache: TieredCache) -> threading.Event:
    """Hold the writer thread until the event is set: what is queued meanwhile is one batch."""
    release = threading.Event()
    cache.writer.submit(lambda: release.wait(30))
    return release


def test_undecodable_bytes_in_requests_never_lose_the_batch(
    db_url: str, tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    settings = make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url, database_url=db_url)
    others = [request_line("GET", f"{S}/v4/getSeries?Collection=Other{i}") for i in range(3)]
    with GatewayServer(settings) as gw:
        cache = gw.app.cache
        assert cache is not None
        release = held_writer(cache)
        for request in [others[0], *UNDECODABLE, *others[1:]]:
            assert send_raw(gw.url, request)[0] == 200
        release.set()
        cache.writer.flush()
        assert cache.writer.written == len(others) + len(UNDECODABLE)
        assert (cache.writer.errors, cache.writer.refused) == (0, 0)
        for request in [*UNDECODABLE, *others]:
            assert b"x-cache: hit" in send_raw(gw.url, request)[1].lower()
        # A purge by the undecodable name (as the CLI passes it from argv) finds its entry.
        purge = cache.writer.submit(lambda: cache.store.purge(collection="\udcff"))
        assert purge.result(timeout=30)[0] == 1
    assert nbia_upstream.app.requests_to("/v4/getSeries")  # they were really forwarded


def test_an_entry_the_database_refuses_is_skipped_and_counted_never_its_neighbours(
    db_url: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cache = tiered(db_url, clock)
    cache.start()
    store = cache.store
    poisoned = series_key("Poisoned")
    real_put = store._put_rows

    def put(connection: Connection, rows: list[Any]) -> int:
        added = real_put(connection, rows)
        if poisoned.digest in {row.digest for row in rows}:  # refused: a duplicate primary key
            for _ in range(2):
                tag = {"key": poisoned.digest, "kind": "series", "value": "twice"}
                connection.execute(insert(CacheTag).values(**tag))
        return added

    store._put_rows = put  # type: ignore[method-assign]
    keys = [series_key(f"C{i}") for i in range(499)]
    keys.insert(250, poisoned)

    async def scenario() -> None:
        release = held_writer(cache)
        for key in keys:
            cache.store_entry(key, answer(key))
        release.set()
        await asyncio.to_thread(cache.writer.flush)

    try:
        asyncio.run(scenario())
        assert (cache.writer.refused, cache.writer.written, cache.writer.errors) == (1, 499, 0)
        with Session(store.engine) as session:
            stored = set(session.scalars(select(CacheEntry.key)))
        assert stored == {key.digest for key in keys} - {poisoned.digest}
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].exc_info is None
        assert cache.from_memory(poisoned.digest) is not None  # still served from memory
    finally:
        cache.close()


# --- item 14: a full disk ---------------------------------------------------------------------


def warnings_from_the_gateway(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("nbia_proxy") and r.levelno >= logging.WARNING
    ]


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def assert_relays_uncached(gw: GatewayServer, upstream: FakeServer, path: str) -> None:
    before = len(upstream.app.requests_to("/v4/getSeries"))
    for _ in range(2):
        relayed = httpx.get(gw.url + path, timeout=30)
        assert (relayed.status_code, relayed.headers["x-cache"]) == (200, "BYPASS")
    assert len(upstream.app.requests_to("/v4/getSeries")) == before + 2
    health = httpx.get(gw.url + "/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["cache"] is True
    assert health["cache_available"] is False
    stats = httpx.get(gw.url + "/_proxy/cache/stats", timeout=30)
    assert stats.status_code == 200
    assert stats.json()["available"] is False and stats.json()["unavailable_reason"]
    purge = httpx.delete(gw.url + "/_proxy/cache", timeout=30)
    assert purge.status_code == 503 and "unavailable" in purge.json()["error"]


def _failing_pragmas(connection: Any, _: Any) -> None:
    raise sqlite3.OperationalError("disk I/O error")


@pytest.mark.parametrize("problem", ["pragmas fail", "migrations fail", "read-only"])
def test_start_up_on_an_unusable_database_relays_uncached_with_one_warning(
    problem: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
) -> None:
    caplog.set_level(logging.INFO)
    extra: dict[str, Any] = {}
    if problem == "pragmas fail":  # what a full disk does to PRAGMA journal_mode=WAL
        monkeypatch.setattr(proxy.db, "_sqlite_pragmas", _failing_pragmas)
    elif problem == "migrations fail":
        (tmp_path / SQLITE_FILE).mkdir(mode=0o700)  # where the database file should be
    else:
        path = tmp_path / SQLITE_FILE
        migrate(f"sqlite:///{path}")
        extra["database_url"] = f"sqlite:///file:{path}?mode=ro&uri=true"
    settings = make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url, **extra)
    with GatewayServer(settings) as gw:
        assert_relays_uncached(gw, nbia_upstream, f"{S}/v4/getSeries?Collection=TCGA-KIRC")
    warnings = warnings_from_the_gateway(caplog)
    assert len(warnings) == 1 and "cannot be used" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert_no_traceback(caplog)


def test_repeated_write_failures_are_logged_once_a_minute_with_a_count(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    migrate(url)
    cache = tiered(url, clock)
    with cache.store.engine.connect() as connection:
        pages = int(connection.exec_driver_sql("PRAGMA page_count").scalar() or 0)
    cache.store.engine.dispose()

    @event.listens_for(cache.store.engine, "connect")
    def _small_database(connection: Any, _: Any) -> None:
        # SQLite's own full condition: the file may grow by a few pages, no more.
        connection.execute(f"PRAGMA max_page_count={pages + 8}")

    cache.start()
    keys = [series_key(f"C{i}") for i in range(60)]

    async def store_one_by_one() -> None:
        for key in keys:
            cache.store_entry(key, answer(key, body=b"x" * 8000))
            await asyncio.to_thread(cache.writer.flush)

    try:
        asyncio.run(store_one_by_one())
        written, failed = cache.writer.written, cache.writer.errors
        assert written >= 1 and failed >= 50
        lines = [r for r in caplog.records if "cache write failed" in r.getMessage()]
        assert len(lines) == 1 and "disk is full" in lines[0].getMessage()
        assert_no_traceback(caplog)
        clock.advance(61)
        cache.writer.flush()  # the writer's housekeeping reports what it held back
        lines = [r for r in caplog.records if "cache write failed" in r.getMessage()]
        assert len(lines) == 2
        assert f"{failed - 1} more times in 61 s" in lines[1].getMessage()
        # What was written before the disk filled is intact.
        for key in keys[:written]:
            stored = cache.store.get(key.digest)
            assert stored is not None and stored.body == b"x" * 8000
    finally:
        cache.close()


def test_a_purge_that_meets_a_full_disk_is_a_507_not_a_500(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
) -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL

    def purge(**_: Any) -> tuple[int, int]:
        raise OperationalError("DELETE FROM cache_entries WHERE ...", {}, full)

    with GatewayServer(make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url)) as gw:
        assert gw.app.cache is not None
        monkeypatch.setattr(gw.app.cache.store, "purge", purge)
        answer = httpx.delete(gw.url + "/_proxy/cache", params={"collection": "X"}, timeout=30)
        assert answer.status_code == 507
        assert answer.json() == {
            "error": "the cache's disk is full: purge everything (no filters) or free some space"
        }


# --- item 14 on a real full file system -------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB file system (tmpfs) to fill up; skipped where a test may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the SQLITE_FULL tests above cover the rest")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}): SQLITE_FULL tests cover it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(path: Path) -> int:
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def fill(disk: Path, name: str = "filler") -> None:
    """Write until the file system refuses another byte."""
    fd = os.open(disk / name, os.O_CREAT | os.O_WRONLY | os.O_APPEND)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    assert free_bytes(disk) == 0


def disk_gateway(disk: Path, upstream: FakeServer) -> GatewayServer:
    # A reserve that suits a 4 MB disk (the default is 256 MB), and a cap on kept binaries it
    # can hold (else the series cache lowers its 50 GB default with a warning of its own).
    settings = make_settings(
        disk / "data",
        upstream.url,
        cache_min_free_disk_bytes=256 * 1024,
        binary_cache_max_bytes=1024 * 1024,
    )
    return GatewayServer(settings)


def warm(gw: GatewayServer, count: int) -> list[str]:
    paths = [f"{S}/v4/getSeries?Collection=Warm{i}" for i in range(count)]
    for path in paths:
        assert httpx.get(gw.url + path, timeout=30).headers["x-cache"] == "MISS"
    assert gw.app.cache is not None
    gw.app.cache.writer.flush()
    return paths


def test_on_a_real_full_disk_the_gateway_relays_logs_once_and_purges_everything(
    small_disk: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with disk_gateway(small_disk, nbia_upstream) as gw:
        paths = warm(gw, 20)
        fill(small_disk)
        for i in range(100):
            cold = httpx.get(gw.url + f"{S}/v4/getSeries?Collection=Cold{i}", timeout=30)
            assert (cold.status_code, cold.headers["x-cache"]) == (200, "MISS")
        assert gw.app.cache is not None
        gw.app.cache.writer.flush()
        stats = httpx.get(gw.url + "/_proxy/cache/stats", timeout=30).json()
        assert stats["entries"] == 20 and stats["write_skipped_low_disk"] >= 100
        failures = [w for w in warnings_from_the_gateway(caplog) if "cache write failed" in w]
        assert len(failures) == 1
        assert_no_traceback(caplog)
        purged = httpx.delete(gw.url + "/_proxy/cache", timeout=30)
        assert purged.status_code == 200 and purged.json()["purged_entries"] == 20
        assert httpx.get(gw.url + "/_proxy/cache/stats", timeout=30).json()["entries"] == 0
        assert httpx.get(gw.url + paths[0], timeout=30).headers["x-cache"] == "MISS"
        # Once there is room again the cache writes again, without a restart.
        (small_disk / "filler").unlink()
        assert httpx.get(gw.url + paths[1], timeout=30).headers["x-cache"] == "MISS"
        gw.app.cache.writer.flush()
        assert httpx.get(gw.url + paths[1], timeout=30).headers["x-cache"] == "HIT"


def test_a_purge_gives_a_full_disk_back_the_space_of_a_cache_that_filled_it(
    small_disk: Path, clock: Clock
) -> None:
    # The cache fills the disk up to its reserve, something else takes the rest, and a purge
    # of everything returns the cache's space to the file system.
    url = f"sqlite:///{small_disk / SQLITE_FILE}"
    migrate(url)
    cache = tiered(url, clock, min_free_disk_bytes=256 * 1024)
    cache.start()

    async def fill_up() -> tuple[int, int]:
        n = 0
        while cache.writer.skipped_low_disk == 0:
            release = held_writer(cache)  # twenty entries to a batch
            for _ in range(20):
                key = series_key(f"C{n}")
                cache.store_entry(key, answer(key, body=os.urandom(5000)))
                n += 1
            release.set()
            await asyncio.to_thread(cache.writer.flush)
        fill(small_disk)
        return await cache.purge()

    try:
        entries, size = asyncio.run(fill_up())
        assert entries == cache.writer.written > 0 and size > 0
        assert cache.writer.errors == 0  # the reserve kept every write from failing
        assert free_bytes(small_disk) >= size  # the database file gave its space back
    finally:
        cache.close()


def test_a_restart_on_a_real_full_disk_relays_uncached_and_loses_nothing_cached(
    small_disk: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    with disk_gateway(small_disk, nbia_upstream) as gw:
        paths = warm(gw, 10)
    fill(small_disk)
    caplog.set_level(logging.INFO)
    with disk_gateway(small_disk, nbia_upstream) as gw:
        assert_relays_uncached(gw, nbia_upstream, paths[0])
    warnings = warnings_from_the_gateway(caplog)
    assert len(warnings) == 1 and "cannot be used" in warnings[0], warnings
    assert_no_traceback(caplog)
    (small_disk / "filler").unlink()
    with disk_gateway(small_disk, nbia_upstream) as gw:
        for path in paths:
            assert httpx.get(gw.url + path, timeout=30).headers["x-cache"] == "HIT"
    database = sqlite3.connect(small_disk / "data" / SQLITE_FILE)
    try:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        database.close()


# --- the write path: one statement a batch, the same accounting as one by one ------------------


def test_a_batch_counts_only_the_bytes_it_adds_and_the_later_of_two_puts_wins(db_url: str) -> None:
    store = CacheStore(make_engine(db_url))
    keys = [series_key(f"C{i}") for i in range(5)]
    try:
        first = store.put_many((key, answer(key, body=b"x" * 100)) for key in keys)
        assert first.refused == {}
        assert first.added_bytes == store.total_bytes() == 5 * answer(keys[0], b"x" * 100).size
        # Two keys replaced (one of them twice in the batch), one new: only the difference.
        again = [
            (keys[0], answer(keys[0], body=b"y" * 10)),
            (keys[1], answer(keys[1], body=b"z" * 300)),
            (keys[1], answer(keys[1], body=b"w" * 200)),
            (series_key("New"), answer(series_key("New"), body=b"n")),
        ]
        before = store.total_bytes()
        second = store.put_many(again)
        assert second.added_bytes == store.total_bytes() - before
        assert second.added_bytes == (10 - 100) + (200 - 100) + answer(keys[0], b"n").size
        stored = store.get(keys[1].digest)
        assert stored is not None and stored.body == b"w" * 200
        # Tags are replaced with their entry, never doubled: a purge by collection finds one.
        assert store.purge(collection="C1") == (1, answer(keys[1], b"w" * 200).size)
        assert store.put_many([]) == Stored(0, {})
    finally:
        store.engine.dispose()

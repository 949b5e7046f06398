"""The cache store fails safe: stale reads, entries the database cannot take, a full disk.

The interleavings are forced with events (a store whose reads wait), never waited for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cache.policy import CacheKey, make_key
from proxy.cache.store import CacheStore, Entry
from proxy.cache.tiers import CacheSettings, TieredCache
from proxy.db import make_engine, migrate
from proxy.endpoints import lookup
from tests.databases import BACKENDS, database
from tests.gateway_server import Clock

NOW = 1_800_000_000.0
SERIES = lookup("/nbia-api/services/v4/getSeries")
assert SERIES is not None


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        migrate(url)
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def tiered(url: str, clock: Clock, recheck_seconds: float = 5.0) -> TieredCache:
    settings = CacheSettings(
        max_bytes=1 << 30,
        memory_bytes=1 << 24,
        recheck_seconds=recheck_seconds,
        keep_expired_seconds=86400.0,
    )
    return TieredCache(CacheStore(make_engine(url)), settings, clock)


def series_key(collection: str) -> CacheKey:
    assert SERIES is not None
    return make_key("nbia", "anonymous", "GET", SERIES, [("Collection", collection)])


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

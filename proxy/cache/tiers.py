"""The cache as the gateway sees it: a memory tier in front of the SQL store.

Lookups try the in-process memory tier (bounded by bytes, least recently used out first) and
then the database, read in a worker thread so the event loop never waits on disk. A memory copy
is checked against the database again after ``recheck_seconds``, so a purge made by another
process or replica reaches this one within that time. Stores go to memory at once and to the
database through the single writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cachetools import LRUCache

from proxy.cache.policy import CacheKey
from proxy.cache.store import CacheStore, EndpointStats, Entry
from proxy.cache.writer import Housekeeping, Writer
from proxy.store_health import StoreHealth


@dataclass(slots=True)
class _Held:
    entry: Entry
    checked_at: float
    # A tick (see TieredCache._settle) at which the entry was known to be in the database;
    # None while the writer has not stored it. A database read that began before that tick may
    # have missed the row, so its miss says nothing about this copy.
    stored_at: int | None


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The knobs of the cache (see :class:`proxy.config.Settings`)."""

    max_bytes: int
    memory_bytes: int
    recheck_seconds: float
    keep_expired_seconds: float
    min_free_disk_bytes: int = 0


class TieredCache:
    """Memory tier + SQL store + writer thread, with per-endpoint hit and miss counts."""

    def __init__(
        self,
        store: CacheStore,
        settings: CacheSettings,
        clock: Callable[[], float] = time.time,
        health: StoreHealth | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        #: Whether the database answers; while it does not, lookups are misses (see lookup).
        self.health = health if health is not None else StoreHealth()
        #: Why the database could not be used at start (the gateway then relays uncached).
        self.unavailable: str | None = None
        self._memory: LRUCache[str, _Held] = LRUCache(
            maxsize=max(settings.memory_bytes, 1), getsizeof=lambda held: held.entry.size
        )
        # The event loop appends, the writer thread drains: a deque is safe for that handoff.
        self._served: deque[str] = deque()
        # The other way round: entries the writer has committed, drained by the event loop.
        self._written: deque[Entry] = deque()
        # Orders the event loop's look-ups and the commits it learns of (event loop only).
        self._tick = 0
        # Hits and misses since start, written only by the event loop; the writer stores the
        # difference to what it stored before, so nothing is lost in a handoff.
        self._counts: dict[str, list[int]] = {}
        self._recorded: dict[str, tuple[int, int]] = {}
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbia-proxy-read")
        self.writer = Writer(
            store,
            Housekeeping(
                settings.max_bytes,
                settings.keep_expired_seconds,
                min_free_disk_bytes=settings.min_free_disk_bytes,
            ),
            self._take_bookkeeping,
            clock,
            on_written=self._written.extend,
            health=self.health,
            # A copy whose write was dropped is settled like a written one: once the database
            # answers again, its miss there drops the copy (and the next request stores it),
            # rather than the copy outliving a purge made elsewhere.
            on_dropped=self._written.extend,
        )

    def start(self) -> None:
        """Start the writer; raises if the database cannot be read or written."""
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self._readers.shutdown(wait=True)
        self.store.engine.dispose()

    def from_memory(self, digest: str) -> Entry | None:
        """The memory copy if it is current enough to trust without the database."""
        held = self._memory.get(digest)
        if held is None or self.clock() - held.checked_at > self.settings.recheck_seconds:
            return None
        return held.entry

    async def lookup(self, digest: str) -> Entry | None:
        """The stored answer for ``digest`` (fresh or not), or None.

        The database is a cache, not a dependency: when it cannot be read within
        ``health.timeout_seconds`` (or fails, or is known to be unreachable) the memory copy,
        however old, is the answer, and without one the lookup is a miss.
        """
        entry = self.from_memory(digest)
        if entry is not None:
            return entry
        health = self.health
        if health.skipping("read"):
            return self._held_copy(digest)
        loop = asyncio.get_running_loop()
        began = self._settle()
        try:
            # The bound holds whatever the driver does (a lock, a dead connection); the read
            # itself may go on in its thread, and its answer is dropped. asyncio.timeout
            # bounds this task's own wait: no waiter future and callbacks per read, as
            # wait_for adds (bench/cache_misses.py).
            async with asyncio.timeout(health.timeout_seconds):
                entry = await loop.run_in_executor(self._readers, self.store.get, digest)
        except Exception as exc:  # noqa: BLE001 -- any failure of a cache read is a miss
            health.failed("read", exc)
            return self._held_copy(digest)
        health.succeeded()
        now = self._settle()
        if entry is not None:
            self._remember(entry, stored_at=now)
            return entry
        held = self._memory.get(digest)
        if held is None:
            return None
        if held.stored_at is None:
            held.checked_at = self.clock()  # not written yet: the database cannot contradict it
            return held.entry
        if held.stored_at >= began:
            # Committed after this read began (a flight landing meanwhile): the miss is stale,
            # and dropping the copy would send the next request upstream again.
            return held.entry
        self._memory.pop(digest, None)  # purged since it was stored (by another process)
        return None

    def _held_copy(self, digest: str) -> Entry | None:
        """The memory copy, unchecked (the database cannot be asked)."""
        held = self._memory.get(digest)
        return None if held is None else held.entry

    def store_entry(self, key: CacheKey, entry: Entry) -> None:
        """Keep ``entry`` in memory now and in the database soon."""
        self._remember(entry, stored_at=None)
        self.writer.put(key, entry)

    def count(self, endpoint: str, hit: bool) -> None:
        """Record a hit (and that the entry was used) or a miss for ``endpoint``."""
        counts = self._counts.get(endpoint)
        if counts is None:
            counts = self._counts[endpoint] = [0, 0]
        counts[0 if hit else 1] += 1

    def served(self, digest: str) -> None:
        self._served.append(digest)

    async def purge(
        self,
        *,
        pattern: str | None = None,
        collection: str | None = None,
        series: str | None = None,
    ) -> tuple[int, int]:
        """Delete matching entries everywhere; returns (entries, bytes) removed."""
        future = self.writer.submit(
            lambda: self.store.purge(pattern=pattern, collection=collection, series=series)
        )
        result: tuple[int, int] = await asyncio.wrap_future(future)
        # Memory copies are cheap to lose: drop them all rather than match the filters twice.
        self._memory.clear()
        return result

    async def purge_tagged(self, upstream: str, tags: Iterable[tuple[str, str]]) -> tuple[int, int]:
        """Delete ``upstream``'s entries tagged with any of ``tags``, everywhere (the update
        feeds' purge); returns (entries, bytes) removed."""
        wanted = list(tags)
        if not wanted:
            return 0, 0  # the usual poll: nothing changed, the memory tier stays warm
        future = self.writer.submit(lambda: self.store.purge_tagged(upstream, wanted))
        result: tuple[int, int] = await asyncio.wrap_future(future)
        self._memory.clear()
        return result

    async def stats(self) -> list[EndpointStats]:
        """Per-endpoint entries and bytes, with hits and misses counted so far."""
        with contextlib.suppress(Exception):  # a full disk: counted and logged by the writer
            await asyncio.wrap_future(self.writer.submit(self.writer.record_bookkeeping))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self.store.stats)

    def memory_bytes(self) -> int:
        return int(self._memory.currsize)

    def _remember(self, entry: Entry, stored_at: int | None) -> None:
        held = self._memory.get(entry.digest)
        if held is not None and held.entry.created_at > entry.created_at:
            held.checked_at = self.clock()  # the memory copy is newer than the database row
            return
        if entry.size <= self._memory.maxsize:
            self._memory[entry.digest] = _Held(entry, self.clock(), stored_at)

    def _settle(self) -> int:
        """Mark the copies the writer has committed since the last call; return a new tick.

        A copy marked at tick ``t`` was committed before any database read that begins at a
        later tick (the writer hands it over only after its commit).
        """
        tick = self._tick
        written = self._written
        for _ in range(len(written)):
            entry = written.popleft()
            held = self._memory.get(entry.digest)
            if held is not None and held.entry is entry:  # not since replaced by a newer one
                held.stored_at = tick
        self._tick = tick + 1
        return self._tick

    def _take_bookkeeping(self) -> tuple[set[str], dict[str, list[int]]]:
        """The entries served and the hit/miss counts added since the last call (writer thread)."""
        served: set[str] = set()
        take = self._served.popleft
        for _ in range(len(self._served)):
            served.add(take())
        deltas: dict[str, list[int]] = {}
        for endpoint, (hits, misses) in self._counts.copy().items():  # copy(): one C call
            done_hits, done_misses = self._recorded.get(endpoint, (0, 0))
            if (hits, misses) != (done_hits, done_misses):
                deltas[endpoint] = [hits - done_hits, misses - done_misses]
                self._recorded[endpoint] = (hits, misses)
        return served, deltas

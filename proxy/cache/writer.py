"""The one thread that writes to the cache database.

New entries are queued without waiting and written in batches; purges and other jobs queue
behind them and hand their result back through a future. Between jobs the thread does the
housekeeping that must never hold up a request: recording which entries were served, adding
hit/miss counts, evicting least-recently-used entries past the size cap, sweeping old ones.

Failures never stop the thread and never flood the log: a full disk fails every write, so each
kind of failure is logged once, then once a minute with a count (and counted for the stats).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from proxy.cache.policy import CacheKey
from proxy.cache.store import CacheStore, Entry
from proxy.db import describe_failure, is_unreachable
from proxy.store_health import StoreHealth

log = logging.getLogger("nbia_proxy.cache")

_BATCH = 500


@dataclass(frozen=True, slots=True)
class Housekeeping:
    """How often and how far the writer tidies up."""

    max_bytes: int
    keep_expired_seconds: float
    interval_seconds: float = 5.0
    min_free_disk_bytes: int = 0  # below this, new entries are not written (0: no check)


class FailureLog:
    """A repeating failure in the log: the first at once, then one line a minute with a count.

    Never a traceback: the reason is one line (:func:`proxy.db.describe_failure`).
    """

    def __init__(self, what: str, clock: Callable[[], float], every_seconds: float = 60.0):
        self._what = what
        self._clock = clock
        self._every = every_seconds
        self._logged_at: float | None = None
        self._unlogged = 0  # failures since the last line
        self._streak = 0  # failures since the last success
        self._last = ""

    def failed(self, reason: str) -> None:
        self._last = reason
        self._unlogged += 1
        self._streak += 1
        if self._logged_at is None:
            log.warning("%s: %s (repeats are logged once a minute)", self._what, reason)
            self._logged_at, self._unlogged = self._clock(), 0
        else:
            self.report_due()

    def report_due(self) -> None:
        """Log the failures not yet logged, if the last line is a minute old."""
        if self._logged_at is None or not self._unlogged:
            return
        now = self._clock()
        if now - self._logged_at >= self._every:
            log.warning(
                "%s %d more times in %d s, lately: %s",
                self._what,
                self._unlogged,
                round(now - self._logged_at),
                self._last,
            )
            self._logged_at, self._unlogged = now, 0

    def succeeded(self) -> None:
        if self._streak:
            self.report_due()
            log.info("%s no more (after %d failures)", self._what, self._streak)
            self._streak = 0


class _Job:
    __slots__ = ("call", "future")

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.future: Future[Any] = Future()


class Writer:
    """Owns all database writes of one gateway process."""

    def __init__(
        self,
        store: CacheStore,
        housekeeping: Housekeeping,
        collect: Callable[[], tuple[set[str], dict[str, list[int]]]],
        clock: Callable[[], float] = time.time,
        on_written: Callable[[list[Entry]], None] = lambda entries: None,
        health: StoreHealth | None = None,
        on_dropped: Callable[[list[Entry]], None] = lambda entries: None,
    ) -> None:
        self._store = store
        self._housekeeping = housekeeping
        self._collect = collect  # takes the served keys and counter deltas gathered so far
        self._on_written = on_written
        self._on_dropped = on_dropped  # entries given up while the database was unreachable
        self._clock = clock
        # An unreachable database is logged and counted there, once, not as write failures.
        self._health = health if health is not None else StoreHealth()
        self._queue: queue.SimpleQueue[tuple[CacheKey, Entry] | _Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nbia-proxy-writer", daemon=True)
        self.total_bytes = 0
        self.written = 0
        self.errors = 0  # database writes and jobs that failed
        self.refused = 0  # entries the database would not take (the rest of their batch was)
        self.skipped_low_disk = 0  # entries not written because the disk was nearly full
        self.skipped_unreachable = 0  # entries dropped while the database was unreachable
        self.evicted = 0  # entries evicted to stay under the cap
        self._failures = FailureLog("cache write failed", clock)
        self._refusals = FailureLog("cache entry refused by the database", clock)

    def start(self) -> None:
        """Check that the database takes writes (raise if not), then start the thread."""
        self.total_bytes = self._store.total_bytes()
        self._store.check_writable()
        self._checkpoint()  # the migrations' writes, say: see _write_batch
        self._thread.start()

    def put(self, key: CacheKey, entry: Entry) -> None:
        """Queue an entry for storage; returns at once."""
        self._queue.put((key, entry))

    def submit(self, call: Callable[[], Any]) -> Future[Any]:
        """Run ``call`` on the writer thread, after everything queued before it."""
        job = _Job(call)
        self._queue.put(job)
        return job.future

    def flush(self) -> None:
        """Block until everything queued so far is written and housekeeping has run."""
        self.submit(self._tidy).result()

    def stop(self) -> None:
        """Write what is queued, tidy once more, and end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    # the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_tidy = time.monotonic() + self._housekeeping.interval_seconds
        while True:
            timeout = max(0.0, next_tidy - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _Job(self._tidy)
            if item is None:
                self._guard(self._tidy)
                return
            if isinstance(item, _Job):
                self._run_job(item)
                if item.call == self._tidy:
                    next_tidy = time.monotonic() + self._housekeeping.interval_seconds
                continue
            self._write_batch([item])

    def _write_batch(self, batch: list[tuple[CacheKey, Entry]]) -> None:
        # Gather whatever else is already queued into the same transaction.
        follow_up: _Job | None = None
        stop = False
        while len(batch) < _BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if isinstance(item, _Job):
                follow_up = item
                break
            batch.append(item)
        # Later puts of the same key win, as they would one by one.
        latest = {key.digest: (key, entry) for key, entry in batch}
        if self._health.skipping("write"):
            # Dropped, not kept for later: the answers were sent, and a queue that grows for
            # the length of an outage would hold the memory of every miss relayed meanwhile.
            self.skipped_unreachable += len(latest)
            self._on_dropped([entry for _, entry in latest.values()])
        elif self._room_for(sum(entry.size for _, entry in latest.values())):
            self._store_batch(latest)
        else:
            self.skipped_low_disk += len(latest)
        # The database file takes the batch now, not a thousand pages later: the WAL never
        # holds more than one batch the file does not, so the free-space check above covers
        # all the next write needs, and a WAL that starts over leaves a full disk room for a
        # purge.
        self._checkpoint()
        if follow_up is not None:
            self._run_job(follow_up)
        if stop:
            self._queue.put(None)

    def _store_batch(self, latest: dict[str, tuple[CacheKey, Entry]]) -> None:
        stored = self._guard(lambda: self._store.put_many(latest.values()))
        if stored is None:
            if self._health.reason is not None:  # lost to the outage, as if skipped
                self.skipped_unreachable += len(latest)
                self._on_dropped([entry for _, entry in latest.values()])
            return
        self._health.succeeded()
        self._failures.succeeded()
        self.total_bytes += stored.added_bytes
        self.written += len(latest) - len(stored.refused)
        for reason in stored.refused.values():
            self.refused += 1
            self._refusals.failed(reason)
        self._on_written(
            [entry for digest, (_, entry) in latest.items() if digest not in stored.refused]
        )
        if self.total_bytes > self._housekeeping.max_bytes:
            # The entries served since the last tidy-up are not the least recently used ones:
            # their use is written first, or a busy cache would evict what it serves most.
            self._guard(self.record_bookkeeping)
            self._guard(self._evict)

    def _checkpoint(self) -> None:
        # Best effort: on a full disk it fails too, and the failed write was reported already.
        with contextlib.suppress(Exception):
            self._store.checkpoint()

    def _room_for(self, batch_bytes: int) -> bool:
        """Whether the disk keeps ``min_free_disk_bytes`` after this batch (in WAL and file)."""
        minimum = self._housekeeping.min_free_disk_bytes
        if minimum <= 0:
            return True
        free = self._guard(self._store.free_disk_bytes)
        if free is None or free - 2 * batch_bytes >= minimum:
            return True
        self._failures.failed(
            f"{free} bytes free on the cache's disk, and writing would leave less than "
            f"{minimum} (cache_min_free_disk_bytes): not written"
        )
        return False

    def _run_job(self, job: _Job) -> None:
        try:
            job.future.set_result(job.call())
        except Exception as exc:  # handed to whoever waits on the future
            self._failed(exc)
            job.future.set_exception(exc)

    def record_bookkeeping(self) -> None:
        """Write which entries were served and the hit/miss counts (writer thread only)."""
        served, counts = self._collect()
        if served:
            self._store.touch(served, self._clock())
        if counts:
            self._store.add_counts(counts)

    def _tidy(self) -> None:
        if self._health.skipping("write"):
            return  # the next one, once the database answers
        self._failures.report_due()
        self._refusals.report_due()
        self.record_bookkeeping()
        self._evict()
        swept = self._store.sweep(self._clock() - self._housekeeping.keep_expired_seconds)
        if swept:
            log.info("swept %d long-expired cache entries", swept)
            self.total_bytes = self._store.total_bytes()
        self._checkpoint()

    def _evict(self) -> None:
        cap = self._housekeeping.max_bytes
        removed, freed = self._store.evict(cap, int(cap * 0.9))
        if removed:
            self.evicted += removed
            log.info("evicted %d cache entries (%d bytes) to stay under %d", removed, freed, cap)
            self.total_bytes = self._store.total_bytes()

    def _guard(self, call: Callable[[], Any]) -> Any:
        """Run a write; a failure is logged (once a minute) and counted, and the thread goes on."""
        try:
            return call()
        except Exception as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        if is_unreachable(exc):
            self._health.failed("write", exc)
            return
        self.errors += 1
        self._failures.failed(describe_failure(exc))

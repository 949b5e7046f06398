"""The one thread that writes to the cache database.

New entries are queued without waiting and written in batches; purges and other jobs queue
behind them and hand their result back through a future. Between jobs the thread does the
housekeeping that must never hold up a request: recording which entries were served, adding
hit/miss counts, evicting least-recently-used entries past the size cap, sweeping old ones.
"""

from __future__ import annotations

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

log = logging.getLogger("nbia_proxy.cache")

_BATCH = 500


@dataclass(frozen=True, slots=True)
class Housekeeping:
    """How often and how far the writer tidies up."""

    max_bytes: int
    keep_expired_seconds: float
    interval_seconds: float = 5.0


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
    ) -> None:
        self._store = store
        self._housekeeping = housekeeping
        self._collect = collect  # takes the served keys and counter deltas gathered so far
        self._on_written = on_written
        self._clock = clock
        self._queue: queue.SimpleQueue[tuple[CacheKey, Entry] | _Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nbia-proxy-writer", daemon=True)
        self._pending_bytes = 0
        self.total_bytes = 0
        self.written = 0
        self.errors = 0

    def start(self) -> None:
        self.total_bytes = self._store.total_bytes()
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
        added = self._guard(lambda: self._store.put_many(latest.values()))
        if added is not None:
            self.total_bytes += added
            self.written += len(latest)
            self._on_written([entry for _, entry in latest.values()])
            if self.total_bytes > self._housekeeping.max_bytes:
                self._guard(self._evict)
        if follow_up is not None:
            self._run_job(follow_up)
        if stop:
            self._queue.put(None)

    def _run_job(self, job: _Job) -> None:
        try:
            job.future.set_result(job.call())
        except Exception as exc:  # handed to whoever waits on the future
            self.errors += 1
            log.exception("cache job failed")
            job.future.set_exception(exc)

    def record_bookkeeping(self) -> None:
        """Write which entries were served and the hit/miss counts (writer thread only)."""
        served, counts = self._collect()
        if served:
            self._store.touch(served, self._clock())
        if counts:
            self._store.add_counts(counts)

    def _tidy(self) -> None:
        self.record_bookkeeping()
        self._evict()
        swept = self._store.sweep(self._clock() - self._housekeeping.keep_expired_seconds)
        if swept:
            log.info("swept %d long-expired cache entries", swept)
            self.total_bytes = self._store.total_bytes()

    def _evict(self) -> None:
        cap = self._housekeeping.max_bytes
        removed, freed = self._store.evict(cap, int(cap * 0.9))
        if removed:
            log.info("evicted %d cache entries (%d bytes) to stay under %d", removed, freed, cap)
            self.total_bytes = self._store.total_bytes()

    def _guard(self, call: Callable[[], Any]) -> Any:
        """Run a write; a failure is logged and counted, and the thread keeps going."""
        try:
            return call()
        except Exception:
            self.errors += 1
            log.exception("cache write failed")
            return None

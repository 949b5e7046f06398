"""A fill: one upstream download per key per process, read by every client while it grows,
checked, then kept.

:class:`Fills` is the registry (like the metadata cache's coalescer): the first request for a
key starts a :class:`Filling`, a task of its own that owns the upstream response; every client,
the first included, is a reader of it. Each chunk goes to a bounded in-memory window (readers
that keep up are served from it) and, in batches, to two worker threads side by side: one
appends it to the temporary file (:class:`~proxy.binary.files.Fill`, past the page cache where
the file system allows: :mod:`proxy.binary.appender`), the other feeds it to the check
(:mod:`proxy.binary.zipcheck`, :mod:`proxy.binary.imagecheck`); readers behind the window read
the file. So memory is flat whatever the download's size, and a joiner gets the bytes already
there at once. The file's sha256 is not taken on the way: the commit reads it back from the
disk once every reader has its last byte (:meth:`proxy.binary.files.Fill.commit`).

The last chunk is held back from every reader until the check's verdict is ok (a zip's last
bytes are its end record: without them no client takes it for complete). A failed check or a
broken upstream fails the filling: every reader's transfer is aborted, nothing is kept, and the
key leaves the registry at once, so the next request fetches afresh.

When the last reader leaves, the fill goes on in the background (``binary_fill_in_background``)
so that a user's retry after a dropped connection is a hit; it is bounded by the upstream read
timeout (a stalled upstream ends it), by ``binary_cache_max_bytes`` (a download that cannot be
kept stops with its last reader), by ``binary_max_background_fills`` (fills going on without any
reader in this process; past it the fill is cancelled and nothing kept) and by the download slot
of the user who left last, which it holds until it ends (``user_max_downloads``). Whether it goes
on is :func:`proxy.binary.decision.go_on_alone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from proxy.binary.decision import go_on_alone
from proxy.binary.disk import read_at
from proxy.binary.files import BinaryStore, Fill, Kept, Meta
from proxy.binary.verdict import Check, Verdict
from proxy.cache.policy import CacheKey
from proxy.endpoints import Endpoint
from proxy.errors import GatewayError, UpstreamError, transport_error
from proxy.forwarding import Forwarding, OutgoingRequest, UpstreamResponse, within
from proxy.headers import RawHeaders, for_client
from proxy.shield.shared import SharedFills
from proxy.streaming import Overflow, read_bounded
from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.binary.fill")

#: Bytes of recent chunks held in memory for the readers that keep up (the bytes not yet on
#: disk are held too, whatever this says; readers further behind read the file).
WINDOW_BYTES = 2 * 1024 * 1024
#: Bytes received that the writer threads have not taken yet (or, when the file broke, that
#: the slowest reader has not read) before the fill stops reading the upstream for a while.
#: Two batches: the one the threads are on and the next. With 1 MiB batches and a 2 MiB
#: backlog, each thread hop's latency (a handoff of the GIL included) held the fill up: the
#: fill waited 1.6 of its 2.3 s per GB for the threads while the two cores were 35 % idle;
#: 4 MiB batches and an 8 MiB backlog made the cold 1 GB download 1.3x faster for 6 MB of
#: peak RSS (bench/series_cache.py). Once the sha256 left the fill for the commit, 3 MiB
#: batches and this backlog were as fast (1.17x and 1.24x nginx's relay, against 0.97x to
#: 1.41x with 8/4) at 97 to 98 MB of peak RSS instead of 99 to 100.
BACKLOG_BYTES = 6 * 1024 * 1024
#: Bytes handed to the writer threads at once.
BATCH_BYTES = 3 * 1024 * 1024
#: Threads of this process's fill writers (two a fill at a time, one while it commits): their
#: own pool, so that fills never hold up the default executor's short jobs (a hit's lookup, a
#: read of a lagging reader); fills beyond four at once queue among themselves.
WRITER_THREADS = 8
#: Kept files remembered per process for requests that raced their fill's commit.
RECENT_FILES = 256
#: The largest piece a reader gets at once.
READ_BYTES = 1024 * 1024

#: What a zip's numbers come from (getSeriesSize): (ObjectCount, TotalSizeInBytes), or None.
SizeSource = Callable[[], Awaitable[tuple[int, int] | None]]


class Held(Protocol):
    """What a reader holds while it reads: one of its user's download slots
    (:class:`proxy.accounts.fairness.Slot`), which a fill it leaves alone takes over."""

    def hand_over(self) -> Callable[[], None]: ...


def _nothing() -> None:
    return None


class FillFailed(Exception):
    """The filling failed after its head was known: readers must abort their transfers."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Head:
    """The upstream's answer head, as every reader relays it."""

    status: int
    headers: RawHeaders  # end-to-end headers for the client (no Content-Length)
    length: int | None  # the upstream's Content-Length, if it sent one
    whole: bytes | None = None  # the body of a non-200 answer, read whole (never kept)


@dataclass(slots=True)
class FillCounters:
    """What the fills of this process did, for the stats."""

    started: int = 0
    joined: int = 0
    kept: int = 0
    background: int = 0  # fills that went on after their last reader left
    stopped_alone: int = 0  # fills cancelled when their last reader left (nothing kept)
    retried: int = 0  # fills started over after the upstream broke off mid-body
    failures: Counter[str] = field(default_factory=Counter)  # by reason


@dataclass(frozen=True, slots=True)
class FillJob:
    """What a fill needs: where to ask, what to ask, how to check the answer."""

    upstream: Upstream
    endpoint: Endpoint
    request: OutgoingRequest
    key: CacheKey
    check: Callable[[], Check]
    sizes: SizeSource | None = None  # zips: NBIA's numbers, fetched beside the download


class Filling:
    """One download in progress: its head, its bytes so far, its outcome."""

    def __init__(self, key: CacheKey) -> None:
        self.key = key
        self.started = time.monotonic()  # for the status page's download rate
        self.head: Head | None = None
        self.error: BaseException | None = None  # before the head: the request's error
        self.failed: FillFailed | None = None  # after the head
        self.kept: Kept | None = None
        self.done = False  # ended (ok or not)
        self.checked = False  # the verdict is ok: every byte is released
        self.received = 0
        self.released = 0  # bytes every reader may have: all but the last chunk until ok
        self.written = 0  # bytes in the temporary file (readable from it)
        self.processed = 0  # bytes the writer has taken (in the file or staged for it)
        self.file_broken = False
        self.readers: dict[int, int] = {}  # reader id -> its offset
        self._window: deque[bytes] = deque()
        self._window_start = 0
        self._window_size = 0
        self._last = 0  # size of the last chunk received (held back until the verdict)
        self._read_fd = -1
        self._changed = asyncio.Event()
        self._next_reader = 0
        self.task: asyncio.Task[None] | None = None
        #: Told when the last reader leaves (with what that reader held) and when a reader
        #: joins (the fill may have been going on alone).
        self.on_idle: Callable[[Filling, Held | None], None] | None = None
        self.on_join: Callable[[Filling], None] | None = None

    # readers -------------------------------------------------------------------------------

    @property
    def joinable(self) -> bool:
        """Whether a new reader can get every byte from the start."""
        return self.failed is None and self.error is None and not self.file_broken

    def join(self) -> int:
        """Register a reader (at offset 0); return its id for :meth:`read` and :meth:`leave`."""
        self._next_reader += 1
        self.readers[self._next_reader] = 0
        if self.on_join is not None:
            self.on_join(self)
        return self._next_reader

    def leave(self, reader: int, held: Held | None = None) -> None:
        """The reader is done (or gone): the fill may go on alone (holding ``held``, the
        reader's download slot) or stop."""
        self.readers.pop(reader, None)
        self._wake()
        if not self.readers:
            if self.done:
                self._close_read_fd()
            elif self.on_idle is not None:
                self.on_idle(self, held)

    async def wait_head(self) -> Head:
        """The upstream's head; raises the request's error when there is none."""
        while self.head is None:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.head

    async def wait_done(self) -> None:
        """Until the fill has ended, ok or not (raises :class:`FillFailed`)."""
        while not self.done:
            await self._wait()
        if self.failed is not None:
            raise self.failed

    async def wait_for(self, end: int) -> bool:
        """Until ``end`` bytes are released (True) or the fill ended (False); raises on failure."""
        while self.released < end and not self.done:
            if self.failed is not None:
                raise self.failed
            await self._wait()
        if self.failed is not None:
            raise self.failed
        return self.released >= end

    async def read(self, reader: int, offset: int, limit: int = READ_BYTES) -> bytes | bytearray:
        """Up to ``limit`` bytes from ``offset`` once they are released; b"" at the end (only
        after a good verdict). Raises :class:`FillFailed` when the fill failed."""
        while True:
            if self.failed is not None:
                raise self.failed
            if offset < self.released:
                data = await self._take(offset, min(limit, self.released - offset))
                if self.failed is not None:
                    raise self.failed  # its file may have been closed under the read
                self.readers[reader] = offset + len(data)
                if self.file_broken:
                    self._wake()  # the window waits for the slowest reader now
                return data
            if self.done or self.checked:
                return b""
            await self._wait()

    async def _take(self, offset: int, count: int) -> bytes | bytearray:
        if offset >= self._window_start:
            return self._from_window(offset, count)
        if self._read_fd < 0 or offset >= self.written:
            # Only when the file broke: the window then waits for the slowest reader, so this
            # is a reader that joined after the window moved on.
            raise FillFailed("reader_lagged", "the reader fell behind a download that is not kept")
        count = min(count, self.written - offset)
        return await read_at(self._read_fd, count, offset)

    def _from_window(self, offset: int, count: int) -> bytes:
        """Bytes from the one chunk holding ``offset`` (no copy when a reader takes a whole
        chunk, as readers that keep up do)."""
        position = self._window_start
        for chunk in self._window:
            end = position + len(chunk)
            if end > offset:
                start = offset - position
                if start == 0 and count >= len(chunk):
                    return chunk
                return chunk[start : start + count]
            position = end
        return b""

    # the writing side ----------------------------------------------------------------------

    def set_head(self, head: Head) -> None:
        self.head = head
        self._wake()

    def open_file(self, fill: Fill) -> None:
        if fill.temp is None or fill.broken is not None:
            self.file_broken = True
            return
        try:
            self._read_fd = os.open(fill.temp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.file_broken = True

    def append(self, chunk: bytes) -> None:
        """A chunk from the upstream: readers may have all before it."""
        self._window.append(chunk)
        self._window_size += len(chunk)
        self.released = self.received
        self.received += len(chunk)
        self._last = len(chunk)
        self._evict()
        self._wake()

    def wrote(self, processed: int, on_disk: int, broken: bool) -> None:
        """The writer has taken ``processed`` bytes, ``on_disk`` of them readable from the
        file (or the file broke)."""
        if broken and not self.file_broken:
            self.file_broken = True
        if not self.file_broken:
            self.written = on_disk
            self.processed = processed
        self._evict()
        self._wake()

    def backlog(self) -> int:
        """Bytes received that the writer has not taken yet (or, the file broken, that the
        slowest reader has not read)."""
        if self.file_broken:
            return self.received - self._floor()
        return self.received - self.processed

    async def wait_progress(self) -> None:
        await self._wait()

    def complete(self) -> None:
        """Every byte is good: release the last chunk and let readers end."""
        self.released = self.received
        self.checked = True
        self._wake()

    def succeed(self, kept: Kept | None) -> None:
        self.kept = kept
        self.released = self.received
        self.done = True
        if not self.readers:
            self._close_read_fd()
        self._wake()

    def fail_before_head(self, error: BaseException) -> None:
        self.error = error
        self.done = True
        self._close_read_fd()
        self._wake()

    def fail(self, failure: FillFailed) -> None:
        if self.failed is None:
            self.failed = failure
        self.done = True
        self._close_read_fd()
        self._wake()

    def _floor(self) -> int:
        """Bytes that may leave the window: on disk, or (file broken) read by every reader."""
        if not self.file_broken:
            return self.written
        return min(self.readers.values(), default=self.received)

    def _evict(self) -> None:
        floor = self._floor()
        while self._window and self._window_size > WINDOW_BYTES:
            first = self._window[0]
            if self._window_start + len(first) > floor:
                break
            self._window.popleft()
            self._window_start += len(first)
            self._window_size -= len(first)

    def _close_read_fd(self) -> None:
        if self._read_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._read_fd)
            self._read_fd = -1

    def _wake(self) -> None:
        self._changed.set()
        self._changed.clear()  # waiters already woken stay woken

    async def _wait(self) -> None:
        await self._changed.wait()


class _Writer:
    """Writes and checks the chunks in a worker thread, in order, in batches."""

    def __init__(self, fill: Fill, check: Check, filling: Filling) -> None:
        self.fill = fill
        self.check = check
        self.filling = filling
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._pending_bytes = 0
        self.error: Exception | None = None

    def put(self, chunk: bytes) -> None:
        if self._stopped or self.error is not None:
            return  # a writer that failed is not started again: the file lacks a batch
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        # In batches: a thread hop per upstream chunk costs the event loop more than the work.
        if self._pending_bytes >= BATCH_BYTES:
            self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def drain(self) -> None:
        if self.error is not None:
            raise self.error
        self._start()
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._task is not None:
            self._task.result()  # an error of the thread surfaces here

    async def stop(self) -> None:
        """Write nothing more, and wait for the batch in the thread (the file is not shared
        between threads: it may be discarded only after)."""
        self._pending = []
        self._stopped = True
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self._pending_bytes = 0
                # Two threads a batch, side by side: the write, which mostly waits for the
                # disk (a direct write returns when the device has the bytes), and the check,
                # which is CPU (CRC-32 and MD5 let go of the GIL). One after the other, each
                # batch waited for the disk before its check began.
                loop = asyncio.get_running_loop()
                done = await asyncio.gather(
                    loop.run_in_executor(_writer_threads(), self.fill.append, batch),
                    loop.run_in_executor(_writer_threads(), self._check, batch),
                    return_exceptions=True,
                )
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
                self.filling.wrote(self.fill.size, self.fill.on_disk, self.fill.broken is not None)
        except Exception as exc:
            # The fill must hear of it: it may be waiting for this writer's progress.
            self.error = exc
            self.filling.wrote(self.fill.size, self.fill.on_disk, True)
            raise

    def _check(self, batch: list[bytes]) -> None:
        for chunk in batch:
            self.check.feed(chunk)


class Fills:
    """The fills of this process, one per key."""

    def __init__(
        self,
        store: BinaryStore,
        forwarding: Forwarding,
        *,
        background: bool,
        max_error_bytes: int,
        max_alone: int = 4,
    ) -> None:
        self.store = store
        self.forwarding = forwarding
        self.background = background
        self.max_alone = max_alone
        self.max_error_bytes = max_error_bytes
        self.counters = FillCounters()
        #: Told the reason of every download not kept (the metrics' validation failures).
        self.on_failure: Callable[[str], None] | None = None
        self._fills: dict[str, Filling] = {}
        # Fills going on without any reader, each with the release of the download slot it
        # holds (that of the user who left last).
        self._alone: dict[Filling, Callable[[], None]] = {}
        # Files kept by the last fills: a request that looked the key up while its fill was
        # committing finds the file here rather than starting another download.
        self._recent: OrderedDict[str, Kept] = OrderedDict()
        #: One fill per key across workers and replicas (the shared store); None: per process.
        self.across: SharedFills | None = None

    def recently_kept(self, digest: str) -> Kept | None:
        """The file the last fill of ``digest`` kept, if it is among the last few and still
        there (a purge or ``cache verify``, from any process, may have removed it since)."""
        kept = self._recent.get(digest)
        if kept is not None and not kept.path.exists():
            self._recent.pop(digest, None)
            return None
        return kept

    def current(self, digest: str) -> Filling | None:
        """The fill in progress for a key that a new reader can join, if any."""
        filling = self._fills.get(digest)
        return filling if filling is not None and filling.joinable else None

    @property
    def in_progress(self) -> int:
        return len(self._fills)

    @property
    def alone(self) -> int:
        """Fills going on without any reader."""
        return len(self._alone)

    def active(self) -> list[Filling]:
        """The fills in progress (for the status page)."""
        return list(self._fills.values())

    def start(self, job: FillJob, attempt: int = 0) -> Filling:
        """Start the fill for ``job``'s key (a task of its own: no client can cancel it)."""
        filling = Filling(job.key)
        filling.on_idle = self._idle
        filling.on_join = self._joined
        self._fills[job.key.digest] = filling
        self.counters.started += 1
        filling.task = asyncio.ensure_future(self._run(filling, job, attempt))
        return filling

    def _idle(self, filling: Filling, held: Held | None) -> None:
        """The last reader left a fill in progress: it goes on alone, holding that reader's
        download slot, or it is cancelled."""
        if filling in self._alone or filling.checked:
            return  # checked: every byte was released, it is being kept (fsync, row)
        if go_on_alone(
            background=self.background,
            file_broken=filling.file_broken,
            alone=len(self._alone),
            max_alone=self.max_alone,
        ):
            self._alone[filling] = held.hand_over() if held is not None else _nothing
            self.counters.background += 1
            log.info("fill of %s goes on without readers", filling.key.endpoint)
            return
        if self.background and not filling.file_broken:
            log.warning(
                "fill of %s stopped: %d fills already go on without readers "
                "(binary_max_background_fills)",
                filling.key.endpoint,
                len(self._alone),
            )
        self.counters.stopped_alone += 1
        if filling.task is not None:
            filling.task.cancel()

    def _joined(self, filling: Filling) -> None:
        """A reader joined: a fill that went on alone is read again, and frees its slot."""
        self._settle(filling)

    def _settle(self, filling: Filling) -> None:
        release = self._alone.pop(filling, None)
        if release is not None:
            release()

    def _forget(self, filling: Filling) -> None:
        if self._fills.get(filling.key.digest) is filling:
            del self._fills[filling.key.digest]

    async def _run(self, filling: Filling, job: FillJob, attempt: int) -> None:
        try:
            await self._attempt(filling, job, attempt)
        finally:
            self._settle(filling)  # its slot, if it went on alone

    async def _attempt(self, filling: Filling, job: FillJob, attempt: int) -> None:
        upstream = job.upstream
        try:
            async with within(self.forwarding.deadline(), upstream.name):
                response = await self.forwarding.open(
                    upstream, job.request, job.endpoint.token, read=True, bulk=True
                )
        except BaseException as exc:
            self._forget(filling)
            filling.fail_before_head(exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:
            if response.status_code != 200:
                await self._answer_whole(filling, response, upstream.name)
                return
            await self._fill(filling, job, response)
        except asyncio.CancelledError:
            self._failed(filling, FillFailed("cancelled", "the download was stopped"))
            raise
        except httpx.HTTPError as exc:
            error = transport_error(exc, upstream.name, mid_body=True)
            self._failed(filling, FillFailed("upstream_broken", error.message))
            self._settle(filling)  # before the retry counts the fills going on alone
            self._again(job, attempt)
        except FillFailed as failure:
            self._failed(filling, failure)
        except Exception as exc:
            log.exception("fill of %s failed", job.key.endpoint)
            self._failed(filling, FillFailed("internal", f"internal error: {exc!r}"))
        finally:
            self._forget(filling)
            await response.aclose()

    async def _answer_whole(
        self, filling: Filling, answer: UpstreamResponse, upstream: str
    ) -> None:
        """A non-200 answer: read whole (bounded) for every reader, never kept."""
        try:
            body = await read_bounded(answer, upstream, self.max_error_bytes)
        except GatewayError as exc:
            filling.fail_before_head(exc)
            return
        if isinstance(body, Overflow):
            await body.aclose()
            filling.fail_before_head(UpstreamError("oversized error answer", upstream=upstream))
            return
        headers = for_client(answer.headers.raw)
        filling.set_head(Head(answer.status_code, headers, len(body), body))
        filling.succeed(None)

    async def _fill(self, filling: Filling, job: FillJob, answer: UpstreamResponse) -> None:
        declared = answer.headers.get("content-length")
        length = int(declared) if declared is not None and declared.strip().isdigit() else None
        headers = for_client(answer.headers.raw)
        filling.set_head(Head(200, headers, length))
        check = job.check()
        sizes = asyncio.ensure_future(job.sizes()) if job.sizes is not None else None
        opening = asyncio.ensure_future(asyncio.to_thread(self.store.open_fill, job.key, length))
        try:
            fill = await asyncio.shield(opening)
        except BaseException:
            # Stopped (its last reader left) while the thread opened the file: the thread
            # opens it whatever becomes of this await, and nobody else would close it.
            if sizes is not None:
                sizes.cancel()
            await _outlast(opening)
            if not opening.cancelled() and opening.exception() is None:
                await asyncio.to_thread(opening.result().discard)
            raise
        filling.open_file(fill)
        writer = _Writer(fill, check, filling)
        committing: asyncio.Future[Kept | None] | None = None
        try:
            async for chunk in answer.aiter_raw():
                if not chunk:
                    continue
                filling.append(chunk)
                writer.put(chunk)
                if check.failure is not None:
                    raise _refused(check.failure)
                while filling.backlog() > BACKLOG_BYTES:
                    if writer.error is not None:
                        raise FillFailed("internal", f"the fill's writer failed: {writer.error!r}")
                    await filling.wait_progress()
                    if filling.failed is not None:
                        raise filling.failed
            await writer.drain()
            await _expect_sizes(check, sizes)
            verdict = await asyncio.to_thread(check.finish)
            if not verdict.ok:
                raise _refused(verdict)
            # The verdict is in: readers may have the end now; the fsync and the row (which
            # wait for the disk) are the fill's business, not their clients'.
            filling.complete()
            meta = Meta(
                content_type=_header(headers, b"content-type") or "application/octet-stream",
                content_disposition=_header(headers, b"content-disposition"),
                validation=verdict.level,
            )
            # On the fill writers' pool: reading a multi-GB file back for its sha256 holds a
            # thread for seconds, which the default executor's short jobs (a hit's lookup, a
            # lagging reader's read) must not queue behind.
            loop = asyncio.get_running_loop()
            committing = loop.run_in_executor(_writer_threads(), fill.commit, meta)
            kept = await asyncio.shield(committing)
            if kept is not None:
                self.counters.kept += 1
                self._recent[kept.digest] = kept
                self._recent.move_to_end(kept.digest)
                while len(self._recent) > RECENT_FILES:
                    self._recent.popitem(last=False)
            self._forget(filling)
            filling.succeed(kept)
        except BaseException:
            if sizes is not None:
                sizes.cancel()
            await writer.stop()
            if committing is not None:
                # The file is the commit thread's until it returns (a cancelled await does not
                # stop it): closing its descriptor under its fsync failed the commit (EBADF),
                # or could have hit another file opened under the same number meanwhile. Only
                # a stop cancels a checked fill: its sha256, read back, ends at the next MiB.
                fill.stop_commit()
                await _outlast(committing)
            await asyncio.to_thread(fill.discard)
            raise

    def _again(self, job: FillJob, attempt: int) -> None:
        """The upstream broke off mid-body: its readers are aborted (they have some of these
        bytes, and NBIA's next zip is not byte-identical), and the download starts over in the
        background, as the shield retries reads, so that their retry joins it or is a hit."""
        retry = self.forwarding.retry
        if not self.background or attempt >= retry.max_attempts:
            return
        if job.key.digest in self._fills:
            return  # a client's retry has started one already
        if not go_on_alone(
            background=True, file_broken=False, alone=len(self._alone), max_alone=self.max_alone
        ):
            return  # it would have no reader: it counts against binary_max_background_fills
        self.counters.retried += 1
        log.info("download of %s broke off; starting it over", job.key.endpoint)
        again = self.start(job, attempt + 1)
        self._alone[again] = _nothing  # until a client's retry joins it

    def _failed(self, filling: Filling, failure: FillFailed) -> None:
        if filling.done:
            return
        self._forget(filling)
        self.counters.failures[failure.reason] += 1
        if self.on_failure is not None:
            self.on_failure(failure.reason)
        log.warning(
            "download of %s not kept (%s): %s; aborting %d readers",
            filling.key.endpoint,
            failure.reason,
            failure.message,
            len(filling.readers),
        )
        filling.fail(failure)


async def _outlast(future: asyncio.Future[Any]) -> None:
    """Until ``future`` (a worker thread's) is done, whatever cancels the wait meanwhile: what
    the thread holds is cleaned up after it, and a fill cancelled a second time during its
    teardown (a reader joined the dying fill and left) must not skip that. The caller is
    raising already; a cancellation here adds nothing to it."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([future])


@functools.cache
def _writer_threads() -> ThreadPoolExecutor:
    """The fill writers' pool, made on first use (per process: a worker's own)."""
    return ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="nbia-proxy-fill")


def _refused(verdict: Verdict) -> FillFailed:
    return FillFailed(verdict.reason or "refused", verdict.message)


async def _expect_sizes(check: Check, sizes: asyncio.Future[tuple[int, int] | None] | None) -> None:
    """Give the zip check NBIA's numbers when they came; without them it checks less."""
    if sizes is None:
        return
    try:
        numbers = await sizes
    except Exception as exc:  # noqa: BLE001 -- never fail the download for the numbers
        log.info("getSeriesSize unavailable (%s): the zip is checked by itself", exc)
        return
    expect = getattr(check, "expect", None)
    if numbers is not None and expect is not None:
        expect(*numbers)


def _header(headers: RawHeaders, name: bytes) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""

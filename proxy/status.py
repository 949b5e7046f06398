"""The gateway's state at a glance: what ``/_proxy/status`` (JSON) and ``/_proxy/`` (HTML) show.

:class:`StatusBoard` keeps the little this needs between requests, all off the hit path: a
ring of per-minute request tallies sampled from the metrics' :class:`~proxy.metrics.Tally`
(a few dict sums every few seconds, nothing per request), the downloads in progress
(:class:`Transfers`, one dict insert per binary request), and the last warnings and errors the
gateway logged (:class:`ErrorRing`). :meth:`StatusBoard.gather` reads the rest when the page
is asked for (upstream circuits and tokens, the cache database, the disks) into a
:class:`Snapshot` of plain dataclasses; :mod:`proxy.status_page` renders it, I/O-free.

With ``--workers N`` the figures are those of the worker that answers, except the cache's
(its database is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, case, func, select
from sqlalchemy.orm import Session

from proxy import __version__
from proxy.audit import Progress
from proxy.binary.tables import BinaryFile, BinaryTag
from proxy.cache.policy import pairs
from proxy.cache.tables import CacheEntry, CacheTag
from proxy.db import describe_failure

if TYPE_CHECKING:
    from proxy.access import Access
    from proxy.binary.files import BinaryStore
    from proxy.binary.serving import SeriesCache
    from proxy.cache.tiers import TieredCache
    from proxy.config import Settings
    from proxy.metrics import Tally
    from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.status")

#: How often the HTML page reloads itself (``<meta http-equiv="refresh">``: no script needed).
REFRESH_SECONDS = 10
#: Minutes of request tallies kept (the page shows them all).
MINUTES = 15
#: How often the tallies are sampled: a minute's figures may be off by up to this.
SAMPLE_SECONDS = 5.0
#: Warnings and errors kept, the newest last.
ERRORS_KEPT = 50
#: Longest message kept of a logged error (the rest is cut).
MESSAGE_CHARS = 500
#: Collections listed as the largest and as the most used.
TOP_COLLECTIONS = 10
#: The downloads in progress listed (the longest-running); the rest are counted: thousands at
#: once would make a page (reloaded every 10 s) of megabytes.
DOWNLOADS_SHOWN = 200
#: What "recently used" means for a collection's cached answers and files.
RECENT_SECONDS = 3600.0
#: A disk is nearly full below this share free (or below twice the cache's reserve).
DISK_FREE_SHARE = 0.10
#: How long the series-to-collection map read from cached getSeries answers is reused.
SERIES_MAP_SECONDS = 60.0
#: How long the cache's figures read from its database are reused: a page left open reloads
#: every REFRESH_SECONDS, and counting a large cache by collection is a scan of its tables.
CACHE_FIGURES_SECONDS = 15.0
#: Where kept downloads of series not found in any cached getSeries answer are counted.
UNKNOWN_COLLECTION = "(collection not known)"

# Parameters that name the series a download is for (as proxy.cache.policy tags them).
_SERIES_PARAMS = frozenset({"seriesinstanceuid", "seriesuid", "seriesid"})


# The snapshot ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenStatus:
    """An upstream's service token: its state and expiry, never the token."""

    state: str  # none, valid, renewing, expired, failing
    expires_in_seconds: float | None
    expires_at: float | None  # Unix time
    renewals: int
    renewal_failures: int
    last_failure: str | None
    last_failure_at: float | None


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One upstream as the gateway sees it (no request is sent to gather this)."""

    name: str
    url: str  # scheme, host and path only
    mount: str
    state: str  # ok, degraded, unreachable (as /healthz)
    reachable: bool
    circuit: str  # closed, open, half-open
    failures_in_a_row: int
    queued: int
    last_error: str | None
    last_error_at: float | None
    token: TokenStatus


@dataclass(frozen=True, slots=True)
class MinuteTally:
    """Requests answered in one minute (from its start, Unix time), and those from the cache."""

    start: float
    requests: int
    from_cache: int
    partial: bool = False  # the minute under way


@dataclass(frozen=True, slots=True)
class Rates:
    """Request and hit rates over the last minutes, oldest first."""

    available: bool
    reason: str | None
    minutes: list[MinuteTally]
    requests_per_second: float | None  # over the last full minutes shown
    from_cache_ratio: float | None


@dataclass(frozen=True, slots=True)
class ClassFigures:
    """What the cache holds of one endpoint class (metadata answers, binary files)."""

    name: str
    entries: int
    bytes: int


@dataclass(frozen=True, slots=True)
class EndpointFigures:
    endpoint: str
    entries: int
    bytes: int
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class CollectionFigures:
    """A collection's cached answers and kept files, and how many were used recently."""

    name: str
    entries: int
    bytes: int
    files: int
    file_bytes: int
    recently_used: int  # answers and files served in the last RECENT_SECONDS

    @property
    def total_bytes(self) -> int:
        return self.bytes + self.file_bytes


@dataclass(frozen=True, slots=True)
class CacheStatus:
    enabled: bool
    available: bool
    reason: str | None
    memory_bytes: int
    classes: list[ClassFigures]
    endpoints: list[EndpointFigures]
    largest_collections: list[CollectionFigures]
    most_used_collections: list[CollectionFigures]


@dataclass(frozen=True, slots=True)
class Download:
    """A download in progress: a client's, or a fill going on with no client (``background``)."""

    kind: str  # client, background
    user: str
    client: str
    endpoint: str
    series: str
    bytes: int
    seconds: float
    bytes_per_second: float


@dataclass(frozen=True, slots=True)
class LoggedError:
    at: float  # Unix time
    level: str
    source: str
    message: str


@dataclass(frozen=True, slots=True)
class Disk:
    """The disk under one of the gateway's directories."""

    name: str  # data_dir, binary_dir
    path: str
    total_bytes: int
    free_bytes: int
    nearly_full: bool


@dataclass(frozen=True, slots=True)
class Alert:
    """Something worth acting on."""

    level: str  # warning, critical
    message: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the status page shows."""

    generated_at: float  # Unix time
    version: str
    pid: int
    access: str
    offline: bool
    refresh_seconds: int
    alerts: list[Alert]
    upstreams: list[UpstreamStatus]
    rates: Rates
    cache: CacheStatus
    downloads: list[Download]
    errors: list[LoggedError]
    disks: list[Disk]
    downloads_not_shown: int = 0  # beyond DOWNLOADS_SHOWN


# What is kept between requests ----------------------------------------------------------------


class MinuteRing:
    """Per-minute tallies from running totals sampled now and then (pure: the caller gives the
    time and the totals). A minute's figure is the totals' growth between the first samples
    after its start and after its end, so it is off by at most the sampling period."""

    def __init__(self, minutes: int = MINUTES) -> None:
        self._closed: deque[MinuteTally] = deque(maxlen=minutes)
        self._start: float | None = None
        self._base = (0, 0)

    def sample(self, now: float, requests: int, from_cache: int) -> None:
        minute = now - now % 60
        if self._start is None:
            # Totals start at 0 with the process: what was counted so far is this minute's.
            self._start = minute
            return
        if minute <= self._start:
            return
        base_requests, base_cache = self._base
        self._closed.append(
            MinuteTally(self._start, requests - base_requests, from_cache - base_cache)
        )
        # Minutes with no sample at all (the loop was blocked): nothing can be said of them.
        for skipped in itertools.islice(
            itertools.count(self._start + 60, 60), int((minute - self._start) // 60) - 1
        ):
            self._closed.append(MinuteTally(skipped, 0, 0))
        self._start, self._base = minute, (requests, from_cache)

    def minutes(self, now: float, requests: int, from_cache: int) -> list[MinuteTally]:
        """The closed minutes, oldest first, and the minute under way."""
        self.sample(now, requests, from_cache)
        assert self._start is not None
        base_requests, base_cache = self._base
        current = MinuteTally(
            self._start, requests - base_requests, from_cache - base_cache, partial=True
        )
        return [*self._closed, current]


def tally_totals(tally: Tally) -> tuple[int, int]:
    """Requests answered so far and those answered from the cache (fresh or stale)."""
    hits = sum(tally.hits.values())
    requests = hits
    from_cache = hits
    for key, count in tally.requests.copy().items():
        requests += int(count)
        if key[3] in ("HIT", "STALE"):
            from_cache += int(count)
    return requests, from_cache


def rates_of(minutes: list[MinuteTally]) -> Rates:
    """The rates over the full minutes among ``minutes`` (the one under way is left out)."""
    full = [m for m in minutes if not m.partial]
    requests = sum(m.requests for m in full)
    cached = sum(m.from_cache for m in full)
    return Rates(
        available=True,
        reason=None,
        minutes=minutes,
        requests_per_second=round(requests / (60 * len(full)), 3) if full else None,
        from_cache_ratio=round(cached / requests, 4) if requests else None,
    )


@dataclass(slots=True)
class _Transfer:
    user: str
    client: str
    endpoint: str
    series: str
    started: float
    progress: Progress


class Transfers:
    """The client downloads in progress in this process (binary requests, relayed or filled)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[int, _Transfer] = {}
        self._ids = itertools.count()

    def begin(self, user: str, client: str, path: str, query: bytes, progress: Progress) -> int:
        """Note a download (its bytes are read from ``progress``); :meth:`end` it after."""
        number = next(self._ids)
        endpoint = path.rsplit("/", 1)[-1]
        self._open[number] = _Transfer(
            user, client, endpoint, named_series(query), self._clock(), progress
        )
        return number

    def end(self, number: int) -> None:
        self._open.pop(number, None)

    def __iter__(self) -> Iterator[Download]:
        now = self._clock()
        for t in list(self._open.values()):
            seconds = max(now - t.started, 1e-6)
            size = t.progress.size
            yield Download(
                "client", t.user, t.client, t.endpoint, t.series, size, seconds, size / seconds
            )


def named_series(query: bytes) -> str:
    """The series a download's query names ("-" when none: a POST form, or a whole study)."""
    with contextlib.suppress(ValueError):
        for name, value in pairs(query):
            if name.lower() in _SERIES_PARAMS:
                return printable(value)
    return "-"


def printable(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, as valid UTF-8: bytes a client sent that are not
    (kept by the query parser as lone surrogates) would make the JSON and the page fail."""
    return text[:limit].encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class ErrorRing(logging.Handler):
    """The last warnings and errors the gateway logged (messages only: no stack traces)."""

    def __init__(self, kept: int = ERRORS_KEPT) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[LoggedError] = deque(maxlen=kept)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the request that logged it
            message = str(record.msg)
        if record.exc_info and record.exc_info[0] is not None:
            message += f" ({record.exc_info[0].__name__})"
        self.records.append(
            LoggedError(record.created, record.levelname, record.name, printable(message))
        )


# Gathering ------------------------------------------------------------------------------------


def upstream_status(upstream: Upstream, now: float) -> UpstreamStatus:
    """An upstream's state from its breaker, limiter and service token (no I/O)."""
    breaker, token = upstream.breaker, upstream.token
    state = "ok"
    if breaker.is_open:
        state = "unreachable" if breaker.unreachable else "degraded"
    left = token.expires_in()
    url = upstream.base_url
    return UpstreamStatus(
        name=upstream.name,
        url=f"{url.scheme}://{url.host}{f':{url.port}' if url.port else ''}{url.path}",
        mount=upstream.config.mount or "/",
        state=state,
        reachable=state != "unreachable",
        circuit=breaker.state,
        failures_in_a_row=breaker.failures,
        queued=upstream.limiter.waiting,
        last_error=breaker.last_failure,
        last_error_at=breaker.last_failure_at,
        token=TokenStatus(
            state=token.state(),
            expires_in_seconds=None if left is None else round(left, 1),
            expires_at=None if left is None else now + left,
            renewals=token.renewals,
            renewal_failures=token.renewal_failures,
            last_failure=token.last_failure,
            last_failure_at=token.last_failure_at,
        ),
    )


def shown_downloads(downloads: list[Download]) -> tuple[list[Download], int]:
    """The :data:`DOWNLOADS_SHOWN` longest-running downloads, and how many more there are."""
    ordered = sorted(downloads, key=lambda d: -d.seconds)
    return ordered[:DOWNLOADS_SHOWN], max(0, len(ordered) - DOWNLOADS_SHOWN)


def background_downloads(series: SeriesCache | None) -> list[Download]:
    """Fills going on with no client reading them (a client's own are in :class:`Transfers`)."""
    if series is None:
        return []
    now = time.monotonic()
    found = []
    for filling in series.fills.active():
        if filling.readers or filling.done:
            continue
        seconds = max(now - filling.started, 1e-6)
        uids = sorted(value for kind, value in filling.key.tags if kind == "series")
        found.append(
            Download(
                "background",
                "-",
                "-",
                filling.key.endpoint.rsplit("/", 1)[-1],
                ", ".join(uids) or "-",
                filling.received,
                seconds,
                filling.received / seconds,
            )
        )
    return found


def disk_of(name: str, path: Path, reserve: int) -> Disk | None:
    """The disk under ``path`` (None when it cannot be read: not made yet)."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    nearly_full = usage.free < max(usage.total * DISK_FREE_SHARE, 2 * reserve)
    return Disk(name, str(path), usage.total, usage.free, nearly_full)


def collection_figures(
    cache_engine: Engine,
    binary_engine: Engine | None,
    series_collections: dict[str, set[str]],
    since: float,
) -> list[CollectionFigures]:
    """Each collection's cached answers and kept files (blocking: run it in a thread).

    An answer counts for the collection its request named; a kept download for the collection
    its request named or, as series downloads name only their series, for the collection that
    cached getSeries answers list its series in.
    """
    answers: dict[str, list[int]] = {}
    recent = func.sum(case((CacheEntry.last_access >= since, 1), else_=0))
    query = (
        select(CacheTag.value, func.count(), func.sum(CacheEntry.size), recent)
        .join(CacheEntry, CacheEntry.key == CacheTag.key)
        .where(CacheTag.kind == "collection")
        .group_by(CacheTag.value)
    )
    with Session(cache_engine) as session:
        for name, count, size, used in session.execute(query):
            answers[name] = [int(count), int(size or 0), int(used or 0)]
    files: dict[str, list[int]] = {}
    if binary_engine is not None:
        of_series = {uid: name for name, uids in series_collections.items() for uid in uids}
        tagged: dict[str, tuple[set[str], int, bool]] = {}
        rows = select(
            BinaryTag.digest, BinaryTag.kind, BinaryTag.value, BinaryFile.size,
            BinaryFile.last_used_at,
        ).join(BinaryFile, BinaryFile.digest == BinaryTag.digest)  # fmt: skip
        with Session(binary_engine) as session:
            for digest, kind, value, size, used_at in session.execute(rows):
                names, _, _ = tagged.setdefault(digest, (set(), int(size), used_at >= since))
                if kind == "collection":
                    names.add(value)
                elif kind == "series" and value in of_series:
                    names.add(of_series[value])
        for names, size, used in tagged.values():
            for name in names or {UNKNOWN_COLLECTION}:
                figures = files.setdefault(name, [0, 0, 0])
                figures[0] += 1
                figures[1] += size
                figures[2] += int(used)
    found = []
    for name in sorted(answers.keys() | files.keys()):
        entries, size, used = answers.get(name, (0, 0, 0))
        kept, kept_size, kept_used = files.get(name, (0, 0, 0))
        found.append(CollectionFigures(name, entries, size, kept, kept_size, used + kept_used))
    return found


def alerts_for(
    offline: bool,
    upstreams: list[UpstreamStatus],
    cache: CacheStatus,
    disks: list[Disk],
    skipped_low_disk: int,
) -> list[Alert]:
    """What is worth acting on, the most serious first (pure)."""
    found: list[Alert] = []
    for disk in disks:
        if disk.nearly_full:
            found.append(
                Alert(
                    "critical",
                    f"the disk of {disk.name} ({disk.path}) is nearly full: "
                    f"{disk.free_bytes} of {disk.total_bytes} bytes free",
                )
            )
    for u in upstreams:
        if u.circuit != "closed":
            why = f": {u.last_error}" if u.last_error else ""
            found.append(
                Alert("critical", f"upstream {u.name} is {u.state}, its circuit {u.circuit}{why}")
            )
        if u.token.state == "failing":
            found.append(
                Alert(
                    "critical",
                    f"the service token of upstream {u.name} cannot be renewed: "
                    f"{u.token.last_failure}",
                )
            )
    if cache.enabled and not cache.available:
        found.append(Alert("critical", f"the cache is not in use: {cache.reason}"))
    if skipped_low_disk:
        found.append(
            Alert(
                "warning",
                f"{skipped_low_disk} cache writes were skipped for low disk space "
                "(cache_min_free_disk_bytes)",
            )
        )
    if offline:
        found.append(
            Alert("warning", "offline mode: only cached answers are served, misses get 504")
        )
    return found


@dataclass
class StatusBoard:
    """What the status page keeps between requests, and the gathering of a :class:`Snapshot`."""

    transfers: Transfers = field(default_factory=Transfers)
    errors: ErrorRing = field(default_factory=ErrorRing)
    ring: MinuteRing = field(default_factory=MinuteRing)
    #: Where requests are counted (the metrics' tally); None when metrics are off.
    tally: Tally | None = None
    clock: Callable[[], float] = time.time
    _series_map: tuple[float, dict[str, set[str]]] | None = None
    _cache_figures: tuple[float, CacheStatus] | None = None
    _figures_reading: asyncio.Future[CacheStatus] | None = None

    def sample(self) -> None:
        """Close the per-minute tallies up to now."""
        if self.tally is not None:
            self.ring.sample(self.clock(), *tally_totals(self.tally))

    async def sample_every(self, seconds: float = SAMPLE_SECONDS) -> None:
        """Sample until cancelled (a task of the app's lifespan)."""
        while True:
            await asyncio.sleep(seconds)
            self.sample()

    def watch_logs(self) -> None:
        """Keep the gateway's warnings and errors (until :meth:`unwatch_logs`)."""
        logging.getLogger("nbia_proxy").addHandler(self.errors)

    def unwatch_logs(self) -> None:
        logging.getLogger("nbia_proxy").removeHandler(self.errors)

    def rates(self) -> Rates:
        if self.tally is None:
            return Rates(False, "metrics are off (metrics_enabled): nothing counts requests", [],
                         None, None)  # fmt: skip
        return rates_of(self.ring.minutes(self.clock(), *tally_totals(self.tally)))

    async def gather(
        self,
        settings: Settings | None,
        upstreams: list[Upstream],
        access: Access,
        cache: TieredCache | None,
        binaries: BinaryStore | None,
        series: SeriesCache | None,
    ) -> Snapshot:
        """The state of the gateway now (the database and the disks are read in a thread)."""
        now = self.clock()
        ups = [upstream_status(u, now) for u in upstreams]
        cache_status = await self._recent_cache_status(cache, binaries, now)
        disks = await asyncio.to_thread(self._disks, settings, binaries)
        skipped = 0 if cache is None else cache.writer.skipped_low_disk
        downloads, not_shown = shown_downloads([*self.transfers, *background_downloads(series)])
        return Snapshot(
            generated_at=now,
            version=__version__,
            pid=os.getpid(),
            access="accounts" if access.accounts else "open",
            offline=settings is not None and settings.offline,
            refresh_seconds=REFRESH_SECONDS,
            alerts=alerts_for(
                settings is not None and settings.offline, ups, cache_status, disks, skipped
            ),
            upstreams=ups,
            rates=self.rates(),
            cache=cache_status,
            downloads=downloads,
            errors=list(reversed(self.errors.records)),
            disks=disks,
            downloads_not_shown=not_shown,
        )

    @staticmethod
    def _disks(settings: Settings | None, binaries: BinaryStore | None) -> list[Disk]:
        if settings is None:
            return []
        reserve = settings.cache_min_free_disk_bytes
        found = [disk_of("data_dir", settings.data_dir, reserve)]
        if binaries is not None:
            found.append(disk_of("binary_dir", binaries.directory, reserve))
        return [d for d in found if d is not None]

    async def _recent_cache_status(
        self, cache: TieredCache | None, binaries: BinaryStore | None, now: float
    ) -> CacheStatus:
        """The cache's figures, read again once they are CACHE_FIGURES_SECONDS old."""
        known = self._cache_figures
        if known is not None and now - known[0] < CACHE_FIGURES_SECONDS and cache is not None:
            if cache.unavailable is None and known[1].available:
                return known[1]
        # One reading at a time, shared by the pages asked for meanwhile: a burst of them as
        # the figures age (or while the database is failing, when none is kept) would each
        # scan the cache tables at once.
        reading = self._figures_reading
        if reading is None:
            reading = asyncio.ensure_future(self._read_cache_status(cache, binaries, now))
            self._figures_reading = reading
        return await asyncio.shield(reading)  # a page gone does not cancel the others' reading

    async def _read_cache_status(
        self, cache: TieredCache | None, binaries: BinaryStore | None, now: float
    ) -> CacheStatus:
        try:
            found = await self._cache_status(cache, binaries, now)
            self._cache_figures = (now, found) if found.available else None
            return found
        finally:
            self._figures_reading = None

    async def _cache_status(
        self, cache: TieredCache | None, binaries: BinaryStore | None, now: float
    ) -> CacheStatus:
        if cache is None:
            return CacheStatus(False, False, "the cache is disabled", 0, [], [], [], [])
        if cache.unavailable is not None:
            return CacheStatus(True, False, cache.unavailable, cache.memory_bytes(), [], [], [], [])
        try:
            rows = await cache.stats()
            classes = [ClassFigures("metadata", sum(r.entries for r in rows),
                                    sum(r.bytes for r in rows))]  # fmt: skip
            if binaries is not None:
                kept = await asyncio.to_thread(binaries.stats)
                classes.append(ClassFigures("binary", kept.files, kept.bytes))
            known = await asyncio.to_thread(self._series_collections, cache.store.engine, now)
            collections = await asyncio.to_thread(
                collection_figures,
                cache.store.engine,
                None if binaries is None else binaries.engine,
                known,
                now - RECENT_SECONDS,
            )
        except Exception as exc:
            reason = f"cache database: {describe_failure(exc)}"
            return CacheStatus(True, False, reason, cache.memory_bytes(), [], [], [], [])
        endpoints = [
            EndpointFigures(r.endpoint, r.entries, r.bytes, r.hits, r.misses) for r in rows
        ]
        largest = sorted(collections, key=lambda c: (-c.total_bytes, c.name))[:TOP_COLLECTIONS]
        used = [c for c in collections if c.recently_used]
        most_used = sorted(used, key=lambda c: (-c.recently_used, c.name))[:TOP_COLLECTIONS]
        return CacheStatus(
            True, True, None, cache.memory_bytes(), classes, endpoints, largest, most_used
        )

    def _series_collections(self, engine: Engine, now: float) -> dict[str, set[str]]:
        """The series of each collection from the cached getSeries answers, reused for a
        while: reading every such answer on each page load would cost more than the page."""
        known = self._series_map
        if known is not None and now - known[0] < SERIES_MAP_SECONDS:
            return known[1]
        from proxy.control import series_by_collection  # the control app imports this module

        found = series_by_collection(engine)
        self._series_map = (now, found)
        return found

"""Prometheus metrics: what the gateway counts, and ``/metrics`` in the exposition format.

Per request the gateway adds to plain ints and lists (:class:`Tally`): a hit costs a few dict
and list operations (about 0.2 µs), not prometheus-client's locked per-label children (about
1 µs a hit for a counter, a histogram and the bytes; 3 µs with its multiprocess files). What
other parts of the gateway already count (the shield, the cache writer, the accounts, the
service tokens) is read when Prometheus scrapes, and so is state (circuits, queues, the cache's
size). At a scrape :func:`render` turns it all
into metric families and prometheus-client writes the text.

With ``--workers N`` every worker writes its figures (its *snapshot*) to a file of its own in
``<data_dir>/metrics/`` once a second and when it stops; the worker that answers a scrape
writes its own first, then adds up every file. A worker that died keeps its file, so its
totals stay in the sums and no counter goes backwards when uvicorn replaces it (its
replacement writes a file under a new name); its gauges (queue lengths, circuits) leave the
sums once its file is no longer refreshed. The parent process empties the directory at start.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy import __version__
from proxy.endpoints import lookup
from proxy.errors import ServiceTokenError, UpstreamTimeout, UpstreamUnreachable
from proxy.token_endpoints import local_endpoint

if TYPE_CHECKING:
    from proxy.access import Access
    from proxy.cache.tiers import TieredCache
    from proxy.shield.counters import ShieldCounters
    from proxy.store_health import StoreHealth
    from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.metrics")

PREFIX = "nbia_proxy_"
METRICS_PATH = "/metrics"
#: Where the workers of ``serve --workers N`` leave their snapshots, in the data dir.
SHARED_DIR = "metrics"
SHARE_SECONDS = 1.0
#: A worker whose file was not refreshed for this long is gone: its gauges leave the sums.
LIVE_SECONDS = 5.0

#: Request durations, seconds: a hit is well under a millisecond, a large download minutes.
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, float("inf"),
)  # fmt: skip
#: Upstream answers, seconds to the answer's head.
UPSTREAM_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"),
)  # fmt: skip

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: its name without the prefix (and, for counters, ``_total``)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    #: Gauges of the shared database: read by the worker that answers, never summed.
    shared: bool = False


#: Every family ``/metrics`` can show (the README lists the same).
FAMILIES = (
    Family(
        "build_info", "gauge", ("version",), "1, labelled with the gateway's version.", shared=True
    ),
    Family(
        "requests",
        "counter",
        ("endpoint", "method", "status", "cache", "outcome"),
        "Requests answered, by endpoint class (metadata, binary, token, control, other, "
        "unknown), method, status class (2xx..5xx), cache result (HIT, MISS, STALE, BYPASS, "
        "JOINED, -) and outcome (ok, aborted, abandoned).",
    ),
    Family(
        "request_duration_seconds",
        "histogram",
        ("endpoint", "cache"),
        "From a request's first byte to its answer's last byte.",
    ),
    Family(
        "response_bytes",
        "counter",
        ("source",),
        "Body bytes sent to clients: from the cache (HIT, STALE), relayed from an upstream "
        "(MISS, JOINED, BYPASS) or the gateway's own answers.",
    ),
    Family(
        "upstream_requests",
        "counter",
        ("upstream", "outcome"),
        "Requests sent upstream (retries too), by outcome: the answer's status class, or error.",
    ),
    Family(
        "upstream_errors",
        "counter",
        ("upstream", "kind"),
        "Upstream requests that got no answer: unreachable, timeout, service_token, other.",
    ),
    Family(
        "upstream_request_duration_seconds",
        "histogram",
        ("upstream",),
        "From sending a request upstream to its answer's head (or the error).",
    ),
    Family(
        "upstream_overload_answers",
        "counter",
        ("status",),
        "Upstream answers 429 (rate limited) and 503 (overloaded).",
    ),
    Family(
        "upstream_retry_after_pauses",
        "counter",
        ("upstream",),
        "Times an upstream's Retry-After paused every request to it.",
    ),
    Family(
        "upstream_retry_after_pause_seconds",
        "counter",
        ("upstream",),
        "Seconds of those pauses (as asked, capped by the retry budget).",
    ),
    Family("upstream_retries", "counter", (), "Reads sent again after a 429 or 503."),
    Family(
        "upstream_rejected",
        "counter",
        ("reason",),
        "Requests the shield refused before they went upstream: queue_full, circuit_open.",
    ),
    Family(
        "coalesced_requests",
        "counter",
        (),
        "Requests that joined another request's upstream fetch instead of making their own.",
    ),
    Family("stale_answers", "counter", (), "Answers served stale from the cache."),
    Family(
        "shared_store_errors",
        "counter",
        (),
        "Calls to the shared store (redis_url) that failed or timed out; meanwhile the limits "
        "were per process.",
    ),
    Family(
        "upstream_circuit_state",
        "gauge",
        ("upstream", "state"),
        "Worker processes whose circuit to the upstream is in this state (closed, open, "
        "half_open).",
    ),
    Family(
        "upstream_queue_length",
        "gauge",
        ("upstream",),
        "Requests waiting for a slot to the upstream.",
    ),
    Family(
        "service_token_renewals",
        "counter",
        ("upstream", "outcome"),
        "Service account token renewals (refresh or login), by outcome: ok, failed.",
    ),
    Family(
        "cache_entries",
        "gauge",
        ("endpoint",),
        "Metadata answers in the cache database, by endpoint.",
        shared=True,
    ),
    Family(
        "cache_bytes",
        "gauge",
        ("endpoint",),
        "Bytes of metadata answers in the cache database, by endpoint.",
        shared=True,
    ),
    Family("cache_memory_bytes", "gauge", (), "Bytes held in the workers' memory tiers."),
    Family("cache_evictions", "counter", (), "Cache entries evicted to stay under the cap."),
    Family(
        "cache_write_failures",
        "counter",
        ("reason",),
        "Cache entries not written: error (a database write failed), refused (the database "
        "would not take it), low_disk.",
    ),
    Family(
        "store_errors",
        "counter",
        ("operation",),
        "Database operations that could not reach it (refused, timed out, locked), by "
        "operation: read, write, binary_lookup, binary_commit, accounts; the request went on "
        "without it.",
    ),
    Family(
        "store_skipped",
        "counter",
        ("operation",),
        "Database operations not tried because it was found unreachable moments before.",
    ),
    Family(
        "binary_files",
        "gauge",
        (),
        "Series downloads kept in the binary store (all replicas), once it is in place.",
        shared=True,
    ),
    Family("binary_bytes", "gauge", (), "Bytes of the kept downloads.", shared=True),
    Family("binary_evictions", "counter", (), "Kept downloads evicted to stay under the cap."),
    Family(
        "binary_not_kept",
        "counter",
        ("reason",),
        "Downloads relayed without being kept: write_failure, too_large, no_room.",
    ),
    Family(
        "validation_failures",
        "counter",
        ("reason",),
        "Downloads whose integrity check failed, by reason (truncated, bad_zip, crc_mismatch, "
        "md5_mismatch, count_mismatch, size_mismatch, ...: proxy.binary.verdict).",
    ),
    Family(
        "feed_polls",
        "counter",
        ("upstream", "outcome"),
        "Update-feed polls, by outcome: ok, failed, busy (another process was polling), "
        "not_due (another replica had polled).",
    ),
    Family(
        "feed_last_success_timestamp_seconds",
        "gauge",
        ("upstream",),
        "When the last successful update-feed poll of the upstream began (Unix time, any replica).",
        shared=True,
    ),
    Family(
        "access_refusals",
        "counter",
        ("reason",),
        "Requests refused by the lab accounts' rules: lockout (wrong credentials from a "
        "locked-out address), rate (a user over the rate).",
    ),
    Family(
        "access_lockouts",
        "counter",
        (),
        "Times a client address was locked out after repeated wrong credentials.",
    ),
    Family(
        "download_queued",
        "counter",
        (),
        "Downloads that waited for one of their user's download slots.",
    ),
)
_BY_NAME = {family.name: family for family in FAMILIES}

#: A status code's class label, by ``status // 100``.
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_SOURCES = {"HIT": "cache", "STALE": "cache", "MISS": "upstream", "JOINED": "upstream"}
_SOURCES["BYPASS"] = "upstream"
_SEP = "\x1f"  # joins a sample's label values into one JSON key


def status_class(status: int) -> str:
    """``2xx`` for 200: a status's class, the bounded label."""
    index = status // 100
    return _STATUS_CLASSES[index] if 0 <= index < len(_STATUS_CLASSES) else "0xx"


def error_kind(exc: Exception) -> str:
    """An upstream error's ``kind`` label."""
    if isinstance(exc, UpstreamUnreachable):
        return "unreachable"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, ServiceTokenError):
        return "service_token"
    return "other"


class Histogram:
    """Counts per bucket (not cumulative) and the sum, in a plain list: ``[*counts, sum]``."""

    __slots__ = ("bounds", "values")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.values = [0.0] * (len(bounds) + 1)

    def observe(self, seconds: float) -> None:
        values = self.values
        values[bisect.bisect_left(self.bounds, seconds)] += 1
        values[-1] += seconds


Samples = dict[tuple[str, ...], float]


class Tally:
    """What this process counts per request and per upstream call (plain numbers: cheap)."""

    def __init__(self) -> None:
        self.requests: Samples = {}
        self.durations: dict[tuple[str, str], Histogram] = {}
        self.response_bytes: Samples = {}
        self.upstream_requests: Samples = {}
        self.upstream_errors: Samples = {}
        self.upstream_durations: dict[tuple[str], Histogram] = {}
        self.pauses: Samples = {}
        self.pause_seconds: Samples = {}
        self.validation_failures: Samples = {}
        # Fresh hits, the hot path, are counted apart (by status; their bytes; their
        # durations) and folded into the families above when a snapshot is taken.
        self.hits: dict[int, int] = {}
        self.hit_bytes = 0
        self.hit_durations = Histogram(REQUEST_BUCKETS)

    def _durations(self, key: tuple[str, str]) -> Histogram:
        histogram = self.durations.get(key)
        if histogram is None:
            histogram = self.durations[key] = Histogram(REQUEST_BUCKETS)
        return histogram

    def hit(self, status: int, size: int, seconds: float) -> None:
        """A fresh hit answered from memory (the hot path: a few plain operations)."""
        hits = self.hits
        hits[status] = hits.get(status, 0) + 1
        self.hit_bytes += size
        values = self.hit_durations.values
        values[bisect.bisect_left(REQUEST_BUCKETS, seconds)] += 1
        values[-1] += seconds

    def folded(self) -> tuple[Samples, dict[tuple[str, str], Histogram], Samples]:
        """``requests``, ``durations`` and ``response_bytes`` with the hits counted in."""
        requests = dict(self.requests)
        for status, count in self.hits.items():
            key = ("metadata", "GET", status_class(status), "HIT", "ok")
            requests[key] = requests.get(key, 0) + count
        durations = dict(self.durations)
        if self.hits:
            known = durations.get(("metadata", "HIT"))
            merged = Histogram(REQUEST_BUCKETS)
            for part in (known, self.hit_durations):
                if part is not None:
                    merged.values = [a + b for a, b in zip(merged.values, part.values, strict=True)]
            durations[("metadata", "HIT")] = merged
        served = dict(self.response_bytes)
        if self.hit_bytes:
            served[("cache",)] = served.get(("cache",), 0) + self.hit_bytes
        return requests, durations, served

    def request(
        self,
        endpoint: str,
        method: str,
        status: int,
        cache: str,
        size: int,
        seconds: float,
        outcome: str = "ok",
    ) -> None:
        """Any other answered request."""
        method = method if method in _METHODS else "other"
        key = (endpoint, method, status_class(status), cache, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._durations((endpoint, cache)).observe(seconds)
        source = (_SOURCES.get(cache, "gateway"),)
        self.response_bytes[source] = self.response_bytes.get(source, 0) + size

    def upstream(self, upstream: str, outcome: str, seconds: float) -> None:
        """One request sent upstream: its outcome (status class or ``error``) and duration."""
        key = (upstream, outcome)
        self.upstream_requests[key] = self.upstream_requests.get(key, 0) + 1
        histogram = self.upstream_durations.get((upstream,))
        if histogram is None:
            histogram = self.upstream_durations[(upstream,)] = Histogram(UPSTREAM_BUCKETS)
        histogram.observe(seconds)

    def upstream_error(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1

    def validation_failed(self, reason: str) -> None:
        """A download failed its integrity check (``reason``: a verdict's reason)."""
        key = (reason,)
        self.validation_failures[key] = self.validation_failures.get(key, 0) + 1

    def paused(self, upstream: str, seconds: float) -> None:
        """An upstream's Retry-After paused the gateway's requests to it."""
        key = (upstream,)
        self.pauses[key] = self.pauses.get(key, 0) + 1
        self.pause_seconds[key] = self.pause_seconds.get(key, 0) + seconds


#: A snapshot: per family name, per joined label values, a number (or a histogram's list).
Snapshot = dict[str, dict[str, Any]]


def _joined(samples: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    return {_SEP.join(labels): value for labels, value in samples.items()}


def add_snapshot(total: Snapshot, part: Snapshot, *, gauges: bool = True) -> None:
    """Add ``part`` into ``total`` (gauges only when ``gauges``: a live worker's)."""
    for name, samples in part.items():
        family = _BY_NAME.get(name)
        if family is None or (family.kind == "gauge" and not gauges):
            continue
        into = total.setdefault(name, {})
        for key, value in samples.items():
            if isinstance(value, list):
                known = into.get(key)
                if known is None:
                    into[key] = list(value)
                else:
                    for i, v in enumerate(value):
                        known[i] += v
            else:
                into[key] = into.get(key, 0) + value


def families(total: Snapshot) -> Iterator[Metric]:
    """The metric families of ``total``, for prometheus-client to write."""
    for family in FAMILIES:
        name = PREFIX + family.name
        samples = total.get(family.name, {})
        metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if family.kind == "counter":
            metric = CounterMetricFamily(name, family.help, labels=family.labels)
        elif family.kind == "gauge":
            metric = GaugeMetricFamily(name, family.help, labels=family.labels)
        else:
            metric = HistogramMetricFamily(name, family.help, labels=family.labels)
        if not family.labels and not samples:
            samples = {"": 0}  # an unlabelled counter or gauge shows its 0
        for key, value in sorted(samples.items()):
            labels = key.split(_SEP) if family.labels else []
            if isinstance(metric, HistogramMetricFamily):
                bounds = UPSTREAM_BUCKETS if family.name.startswith("upstream") else REQUEST_BUCKETS
                cumulative, buckets = 0.0, []
                for bound, count in zip(bounds, value[:-1], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                metric.add_metric(labels, buckets, value[-1])
            else:
                metric.add_metric(labels, value)
        yield metric


class _Once:
    """A collector of one scrape's families."""

    def __init__(self, total: Snapshot) -> None:
        self._total = total

    def collect(self) -> Iterator[Metric]:
        return families(self._total)


def exposition(total: Snapshot) -> bytes:
    """``total`` in Prometheus's text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once(total))
    return generate_latest(registry)


class Sharing:
    """This worker's file among those of ``serve --workers N``, and the sum of all of them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # A name of its own even if the pid of a dead worker comes round again.
        self.path = directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"

    def write(self, snapshot: Snapshot) -> None:
        """Replace this worker's file with ``snapshot`` (whole: a reader never sees half)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps(snapshot), encoding="utf-8")
        os.replace(partial, self.path)

    def others(self) -> Iterator[tuple[Snapshot, bool]]:
        """The other workers' snapshots, each with whether that worker is alive."""
        now = time.time()
        try:
            names = list(self.directory.glob("*.json"))
        except OSError:
            return
        for path in names:
            if path == self.path:
                continue
            try:
                live = now - path.stat().st_mtime < LIVE_SECONDS
                snapshot = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # removed meanwhile, or not ours
            yield snapshot, live


def shared_dir(data_dir: Path) -> Path:
    return data_dir / SHARED_DIR


def clear_shared(data_dir: Path) -> None:
    """Empty the workers' directory (the parent, before it starts the workers): figures of an
    earlier run must not be added to this one's."""
    directory = shared_dir(data_dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


async def share_every(sharing: Sharing, snapshot: Any, seconds: float = SHARE_SECONDS) -> None:
    """Write this worker's snapshot every ``seconds`` (``snapshot``: a callable making it)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            sharing.write(snapshot())
        except OSError as exc:
            log.warning("cannot write the metrics file %s: %s", sharing.path, exc)


def bearer_matches(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant
    time)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            if scheme.lower() == b"bearer":
                with contextlib.suppress(UnicodeEncodeError):
                    return hmac.compare_digest(given.strip(), token.encode("utf-8"))
    return False


_CIRCUIT_STATES = ("closed", "open", "half-open")


class Metrics:
    """The figures of one gateway process: its :class:`Tally` and the objects it reads at a
    scrape (the shield's counters, the upstreams, the accounts, the cache)."""

    def __init__(
        self,
        counters: ShieldCounters,
        upstreams: list[Upstream],
        access: Access,
        cache: TieredCache | None,
        sharing: Sharing | None = None,
    ) -> None:
        self.tally = counters.tally
        self._counters = counters
        self._upstreams = upstreams
        self._access = access
        self._cache = cache
        self.sharing = sharing
        #: The binary store (a :class:`proxy.binary.files.BinaryStore`), once the app has one:
        #: its ``counters`` and ``stats()`` are read at a scrape.
        self.binary: Any = None
        #: The update-feed poller (a :class:`proxy.feeds.poller.FeedPoller`), when polling.
        self.feeds: Any = None

    def _health(self) -> StoreHealth | None:
        """The database's state as this process sees it (None without a database)."""
        if self._cache is not None:
            return self._cache.health
        directory = self._access.directory
        return None if directory is None else directory.health

    def snapshot(self) -> Snapshot:
        """This process's figures, as :func:`add_snapshot` and the workers' files take them."""
        t, c, access = self.tally, self._counters, self._access
        requests, durations, served = t.folded()
        snap: Snapshot = {
            "requests": _joined(requests),
            "request_duration_seconds": {
                _SEP.join(k): list(h.values) for k, h in durations.items()
            },
            "response_bytes": _joined(served),
            "upstream_requests": _joined(t.upstream_requests),
            "upstream_errors": _joined(t.upstream_errors),
            "upstream_request_duration_seconds": {
                _SEP.join(k): list(h.values) for k, h in t.upstream_durations.items()
            },
            "upstream_overload_answers": {"429": c.upstream_429, "503": c.upstream_503},
            "upstream_retry_after_pauses": _joined(t.pauses),
            "upstream_retry_after_pause_seconds": _joined(t.pause_seconds),
            "upstream_retries": {"": c.retries},
            "upstream_rejected": {
                "queue_full": c.rejected_queue_full,
                "circuit_open": c.rejected_circuit_open,
            },
            "coalesced_requests": {"": c.coalesced},
            "stale_answers": {"": c.stale_served},
            "shared_store_errors": {"": c.shared_store_errors},
            "access_refusals": {"lockout": access.lockout.refused, "rate": access.limits.refused},
            "access_lockouts": {"": access.lockout.lockouts},
            "download_queued": {"": access.limits.queued},
            "validation_failures": _joined(t.validation_failures),
        }
        if self.binary is not None:
            kept = self.binary.counters
            snap["binary_evictions"] = {"": kept.evicted}
            snap["binary_not_kept"] = {
                "write_failure": kept.write_failures,
                "too_large": kept.too_large,
                "no_room": kept.no_room,
            }
        if self.feeds is not None:
            snap["feed_polls"] = {
                _SEP.join((name, outcome)): count
                for name, state in self.feeds.states.items()
                for outcome, count in state.polls.items()
            }
        circuits: dict[str, Any] = {}
        queues: dict[str, Any] = {}
        renewals: dict[str, Any] = {}
        for u in self._upstreams:
            state = u.breaker.state
            for s in _CIRCUIT_STATES:
                circuits[_SEP.join((u.name, s.replace("-", "_")))] = int(s == state)
            queues[u.name] = u.limiter.waiting
            renewals[_SEP.join((u.name, "ok"))] = u.token.renewals
            renewals[_SEP.join((u.name, "failed"))] = u.token.renewal_failures
        snap["upstream_circuit_state"] = circuits
        snap["upstream_queue_length"] = queues
        snap["service_token_renewals"] = renewals
        health = self._health()
        if health is not None:
            snap["store_errors"] = dict(health.errors)
            snap["store_skipped"] = dict(health.skipped)
        cache = self._cache
        if cache is not None:
            writer = cache.writer
            snap["cache_memory_bytes"] = {"": cache.memory_bytes()}
            snap["cache_evictions"] = {"": writer.evicted}
            snap["cache_write_failures"] = {
                "error": writer.errors,
                "refused": writer.refused,
                "low_disk": writer.skipped_low_disk,
            }
        return snap

    async def render(self) -> bytes:
        """``/metrics``: every worker's figures added up, and the cache database's size."""
        total: Snapshot = {}
        own = self.snapshot()
        if self.sharing is not None:
            # Written first: what this scrape shows is on disk should this worker die.
            await asyncio.to_thread(self._add_shared, own, total)
        add_snapshot(total, own)
        cache = self._cache
        health = self._health()
        if health is not None and health.reason is not None:
            # Figures kept in the database are left out while it is unreachable (the outage
            # is logged once, and shown by nbia_proxy_store_errors_total).
            total["build_info"] = {__version__: 1}
            return exposition(total)
        if cache is not None and cache.unavailable is None:
            try:
                rows = await cache.stats()
            except Exception as exc:  # the rest of the figures still count
                log.warning("metrics: cache statistics unavailable: %s", exc)
            else:
                total["cache_entries"] = {r.endpoint: r.entries for r in rows}
                total["cache_bytes"] = {r.endpoint: r.bytes for r in rows}
        if self.binary is not None:
            try:
                kept = await asyncio.to_thread(self.binary.stats)
            except Exception as exc:
                log.warning("metrics: binary store statistics unavailable: %s", exc)
            else:
                total["binary_files"] = {"": kept.files}
                total["binary_bytes"] = {"": kept.bytes}
        if self.feeds is not None:
            try:
                positions = await asyncio.to_thread(self.feeds.positions)
            except Exception as exc:
                log.warning("metrics: update feed positions unavailable: %s", exc)
            else:
                total["feed_last_success_timestamp_seconds"] = {
                    p.upstream: p.last_success for p in positions if p.last_success is not None
                }
        total["build_info"] = {__version__: 1}
        return exposition(total)

    def _add_shared(self, own: Snapshot, total: Snapshot) -> None:
        assert self.sharing is not None
        try:
            self.sharing.write(own)
        except OSError as exc:
            log.warning("cannot write the metrics file %s: %s", self.sharing.path, exc)
        for snapshot, live in self.sharing.others():
            add_snapshot(total, snapshot, gauges=live)

    async def share(self) -> None:
        """Write this worker's file once a second (until cancelled)."""
        assert self.sharing is not None
        await share_every(self.sharing, self.snapshot)

    def last_write(self) -> None:
        """The final totals of a worker that stops (so they stay in the sums)."""
        if self.sharing is not None:
            try:
                self.sharing.write(self.snapshot())
            except OSError as exc:
                log.warning("cannot write the metrics file %s: %s", self.sharing.path, exc)


def endpoint_class(below_mount: str | None) -> str:
    """The ``endpoint`` label of a request: ``control`` for the gateway's own paths (None),
    else, by the path below its upstream's mount, ``token``, ``metadata``, ``binary`` or
    ``other`` (not catalogued)."""
    if below_mount is None:
        return "control"
    if local_endpoint(below_mount) is not None:
        return "token"
    endpoint = lookup(below_mount)
    if endpoint is None:
        return "other"
    return "binary" if endpoint.payload.is_binary else "metadata"

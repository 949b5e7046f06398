"""The control app: the gateway's own endpoints, under paths that cannot collide with NBIA's.

``/healthz``, ``/readyz`` and ``/_proxy/...``; every ``/nbia-api/`` path is handled by the
gateway before it gets here.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy import __version__
from proxy.access import Access
from proxy.cache.store import EndpointStats
from proxy.cache.tables import CacheEntry
from proxy.cache.tiers import TieredCache
from proxy.config import Settings
from proxy.db import (
    DEFAULT_TIMEOUT_SECONDS,
    SCHEMA_HEAD,
    database_url,
    describe_failure,
    is_disk_full,
    is_unreachable,
    make_engine,
)
from proxy.errors import ClientError
from proxy.metrics import METRICS_PATH, Metrics, bearer_matches
from proxy.shield.counters import ShieldCounters
from proxy.status import Snapshot as StatusSnapshot
from proxy.status import StatusBoard
from proxy.status_page import CONTENT_SECURITY_POLICY, render
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.binary.files import BinaryStats, BinaryStore
    from proxy.binary.serving import SeriesCache
    from proxy.feeds.poller import FeedPoller


def stats_document(rows: list[EndpointStats], extra: dict[str, Any]) -> dict[str, Any]:
    """Cache statistics as JSON: totals and one object per endpoint."""
    hits = sum(r.hits for r in rows)
    misses = sum(r.misses for r in rows)
    return {
        "entries": sum(r.entries for r in rows),
        "bytes": sum(r.bytes for r in rows),
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        **extra,
        "endpoints": {
            r.endpoint: {
                "entries": r.entries,
                "bytes": r.bytes,
                "hits": r.hits,
                "misses": r.misses,
                "hit_ratio": None if r.hit_ratio is None else round(r.hit_ratio, 4),
            }
            for r in rows
        },
    }


#: The query parameters of ``DELETE /_proxy/cache``: its filters (by their name in
#: :meth:`TieredCache.purge`), and ``all``.
_PURGE_FILTERS = {"path": "pattern", "collection": "collection", "series": "series"}
_PURGE_PARAMETERS = (*_PURGE_FILTERS, "all")
_MAX_FILTER_LENGTH = 200


def purge_filters(parameters: list[tuple[str, str]]) -> dict[str, str]:
    """The filters of a purge request, as keywords of :meth:`TieredCache.purge`; none means
    everything (no parameter at all, or ``all=true``).

    Any mistake is a :class:`ClientError`: an unknown parameter (a typo of a filter must not
    widen the purge to everything), an empty or repeated one, or ``all`` beside a filter.
    """
    given: dict[str, str] = {}
    for name, value in parameters:
        if name not in _PURGE_PARAMETERS:
            raise ClientError(
                f"unknown parameter {name[:40]}: the accepted ones are "
                f"{', '.join(_PURGE_PARAMETERS)} (all=true alone purges everything)"
            )
        if name in given:
            raise ClientError(f"give {name} once")
        if name == "all" and value != "true":
            raise ClientError("all takes only all=true (purge everything)")
        if not value:
            raise ClientError(f"{name} is empty: give a value, or all=true alone for everything")
        if len(value) > _MAX_FILTER_LENGTH:
            raise ClientError(f"{name} is longer than {_MAX_FILTER_LENGTH} characters")
        given[name] = value
    if given.pop("all", None) and given:
        raise ClientError("all=true purges everything: give it without path, collection or series")
    return {_PURGE_FILTERS[name]: value for name, value in given.items()}


def binaries_document(totals: BinaryStats, series: SeriesCache | None = None) -> dict[str, Any]:
    """The series cache's kept files (all replicas, from the database) and, from a running
    gateway, what this process served from them, filled and refused to keep."""
    document: dict[str, Any] = {
        "files": totals.files,
        "bytes": totals.bytes,
        "max_bytes": totals.max_bytes,
    }
    if series is not None:
        live = series.stats()
        counters = totals.counters
        document.update(
            {
                "hits": live["hits"],
                "bytes_from_disk": live["bytes_from_disk"],
                "fills_in_progress": live["fills_in_progress"],
                "fills_started": live["fills_started"],
                "fills_joined": live["fills_joined"],
                "fills_kept": live["fills_kept"],
                "fills_alone": live["fills_alone"],
                "fills_stopped_alone": live["fills_stopped_alone"],
                "validation_failures": live["validation_failures"],
                "write_failures": counters.write_failures,
                # Why the last download could not be kept (disk full, not writable): the
                # stats say so, not only the log line written once.
                "last_write_failure": counters.last_failure,
                "too_large": counters.too_large,
                "no_room": counters.no_room,
                "evicted": counters.evicted,
                "dropped": counters.dropped,
            }
        )
    return document


def series_by_collection(engine: Engine) -> dict[str, set[str]]:
    """The series of each collection, as the cached getSeries answers list them (blocking).

    Run it before a metadata purge by collection: that purge drops the very answers read here.
    """
    found: dict[str, set[str]] = {}
    for item in cached_series_rows(engine):
        uid, collection = item.get("SeriesInstanceUID"), item.get("Collection")
        if isinstance(uid, str) and isinstance(collection, str):
            found.setdefault(collection, set()).add(uid)
    return found


def cached_series_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every row of every cached getSeries answer (blocking; repeats included)."""
    query = select(CacheEntry.body, CacheEntry.headers).where(
        CacheEntry.endpoint.like("%getSeries"), CacheEntry.status == 200
    )
    with Session(engine) as session:
        return [
            item for body, headers in session.execute(query) for item in _json_list(body, headers)
        ]


def _json_list(body: bytes, headers: str) -> list[dict[str, Any]]:
    """A stored answer's body as a list of JSON objects; empty when it is not one."""
    try:
        encodings = {v.strip().lower() for k, v in json.loads(headers) if k.lower() == _ENCODING}
        if "gzip" in encodings:
            body = gzip.decompress(body)
        elif encodings - {"identity"}:
            return []
        items = json.loads(body)
    except (ValueError, TypeError, OSError, EOFError):
        return []
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, dict)]


_ENCODING = "content-encoding"


def purge_binaries(
    store: BinaryStore, filters: dict[str, str], known: dict[str, set[str]]
) -> dict[str, int]:
    """Purge the kept files with a metadata purge's filters (blocking: run it in a thread).

    Kept files are matched by what their request named: a series download names only its
    series, which ``known`` (:func:`series_by_collection`) maps to its collection. A purge by
    collection does not guess at the rest: it counts them (``files_of_unknown_collection``).
    The control endpoint first asks the upstreams' getSeries of the collection when some files
    are unknown (:meth:`proxy.binary.serving.SeriesCache.collection_series`); the command line,
    without a running gateway, cannot.
    """
    collection = filters.get("collection")
    series = known.get(collection, set()) if collection else set()
    files, size = store.purge(**filters, collection_series=series)
    answer = {"purged_files": files, "purged_file_bytes": size}
    if collection:
        answer["files_of_unknown_collection"] = store.without_collection(
            set().union(*known.values())
        )
    return answer


def shield_document(upstreams: list[Upstream], counters: ShieldCounters) -> dict[str, Any]:
    """What the upstream shield did, and the state of each upstream's breaker and queue."""
    return {
        **asdict(counters),
        "upstreams": {
            u.name: {
                "circuit": u.breaker.state,
                "queued": u.limiter.waiting,
                "paused_for_seconds": round(max(0.0, u.limiter.paused_until - time.monotonic()), 1),
            }
            for u in upstreams
        },
    }


def upstream_health(upstream: Upstream) -> dict[str, str]:
    """An upstream as /healthz shows it: where it is mounted, its state and its circuit's.

    ``ok``; ``unreachable`` while its circuit is open after failures to connect; ``degraded``
    while it is open for other failures (5xx answers, time-outs). With the last failure's
    reason while it is not ok (the gateway's own error message: no secrets).
    """
    breaker = upstream.breaker
    state = "ok"
    if breaker.is_open:
        state = "unreachable" if breaker.unreachable else "degraded"
    health = {"mount": upstream.config.mount or "/", "state": state, "circuit": breaker.state}
    if state != "ok" and breaker.last_error:
        health["last_error"] = breaker.last_error
    return health


def database_state(cache: TieredCache | None) -> str:
    """The database as /healthz shows it: ``ok``, ``unreachable``, or ``none`` (no cache)."""
    if cache is None:
        return "none"
    if cache.unavailable is not None:
        return "unreachable"
    return cache.health.state


def schema_problem(url: str, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> str | None:
    """Why the database is not ready to serve (unreachable, or migrations pending); None
    when it is. Blocking: run it in a thread."""
    engine = make_engine(url, timeout_seconds)
    try:
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            found = version.scalar()
    except Exception as exc:
        if "alembic_version" in str(exc):
            return "migrations pending (no schema yet)"
        return f"database unreachable: {describe_failure(exc)}"
    finally:
        engine.dispose()
    if found != SCHEMA_HEAD:
        return f"migrations pending (schema {found}, this version needs {SCHEMA_HEAD})"
    return None


def access_document(access: Access) -> dict[str, Any]:
    """The access mode and what it turned away."""
    return {
        "mode": "accounts" if access.accounts else "open",
        "lockout_refusals": access.lockout.refused,
        "rate_refusals": access.limits.refused,
        "downloads_queued": access.limits.queued,
    }


def control_app(
    upstreams: list[Upstream],
    cache: TieredCache | None,
    counters: ShieldCounters,
    access: Access,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]],
    settings: Settings | None = None,
    metrics: Metrics | None = None,
    binaries: BinaryStore | None = None,
    series: Callable[[], SeriesCache | None] | None = None,
    feeds: FeedPoller | None = None,
    board: StatusBoard | None = None,
) -> FastAPI:
    """The control endpoints; ``binaries`` is the series cache's store (None when off),
    ``series`` gives the running series cache (None while it is off), for its live figures,
    ``feeds`` is the update-feed poller (None when off) and ``board`` keeps what the status
    page shows between requests."""
    # /docs is added by proxy.app with its assets served from here; ReDoc only loads from a CDN.
    app = FastAPI(
        title="nbia-proxy", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )
    status_board = board or StatusBoard()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail).lower()
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness: ``status`` is "ok" (HTTP 200) whenever the process answers, and each
        upstream is "degraded" while its circuit is open (the gateway still serves its cache
        then, so a load balancer must not take it out for that)."""
        return {
            "status": "ok",
            "version": __version__,
            "cache": cache is not None,
            "cache_available": cache is not None and cache.unavailable is None,
            # ok or unreachable (relaying without it), as the request path last found it.
            "database": database_state(cache),
            "upstreams": {u.name: upstream_health(u) for u in upstreams},
        }

    @app.get("/readyz", response_model=None)
    async def readyz() -> dict[str, object] | JSONResponse:
        """Readiness: 503 while the database the gateway needs is unreachable or its schema
        is not up to date; 200 otherwise (with no database at all too)."""
        problem = None
        uses_database = cache is not None or access.accounts or access.registry is not None
        if settings is not None and uses_database:
            url = database_url(settings.database_url, settings.data_dir)
            timeout = settings.database_timeout_seconds
            problem = await asyncio.to_thread(schema_problem, url, timeout)
        if problem is None and cache is not None and cache.unavailable is not None:
            problem = f"relaying uncached until a restart: {cache.unavailable}"
        if problem is not None:
            return JSONResponse({"status": "not ready", "reason": problem}, status_code=503)
        return {"status": "ready"}

    @app.get("/_proxy/cache/stats")
    async def cache_stats() -> dict[str, Any]:
        """Entries, bytes, hits, misses and hit ratio, in total and per endpoint."""
        if cache is None:
            raise StarletteHTTPException(404, "the cache is disabled")
        extra = {
            "available": cache.unavailable is None,
            "memory_bytes": cache.memory_bytes(),
            "write_errors": cache.writer.errors,
            "write_refused_entries": cache.writer.refused,
            "write_skipped_low_disk": cache.writer.skipped_low_disk,
            "write_skipped_unreachable": cache.writer.skipped_unreachable,
            "database": cache.health.document(),
            "shield": shield_document(upstreams, counters),
            "access": access_document(access),
        }
        if cache.unavailable is not None:
            return stats_document([], {**extra, "unavailable_reason": cache.unavailable})
        if cache.health.reason is not None:
            # The figures live in the database: the answer says why they are missing, and
            # does not wait for it.
            return stats_document([], extra)
        try:
            rows = await asyncio.wait_for(cache.stats(), cache.health.timeout_seconds)
            if binaries is not None:
                totals = await asyncio.to_thread(binaries.stats)
                running = None if series is None else series()
                extra["binaries"] = binaries_document(totals, running)
            if feeds is not None:
                extra["feeds"] = await feeds.document()
        except Exception as exc:
            if is_unreachable(exc):
                cache.health.failed("read", exc)
                return stats_document([], {**extra, "database": cache.health.document()})
            raise StarletteHTTPException(503, f"cache database: {describe_failure(exc)}") from exc
        return stats_document(rows, extra)

    async def snapshot() -> StatusSnapshot:
        running = None if series is None else series()
        return await status_board.gather(settings, upstreams, access, cache, binaries, running)

    @app.get("/_proxy/status")
    async def status_json() -> dict[str, Any]:
        """The status page's figures as JSON (see README, Status page); times are Unix
        seconds."""
        return asdict(await snapshot())

    @app.get("/_proxy/", response_class=HTMLResponse)
    async def status_page() -> HTMLResponse:
        """The status page: upstreams, request rates, cache, downloads, errors, warnings."""
        return HTMLResponse(
            render(await snapshot()),
            headers={
                "content-security-policy": CONTENT_SECURITY_POLICY,
                "cache-control": "no-store",
                "x-content-type-options": "nosniff",
            },
        )

    @app.get(METRICS_PATH, include_in_schema=False)
    async def metrics_page(request: Request) -> Response:
        """Prometheus metrics (see README, Metrics). In accounts mode the gateway let only an
        admin or the ``metrics_token`` this far; in open mode a set token is required here."""
        if metrics is None:
            raise StarletteHTTPException(404, "metrics are off (metrics_enabled)")
        token = None if settings is None else settings.metrics_token
        if token is not None and not access.accounts:
            if not bearer_matches(request.scope["headers"], token.get_secret_value()):
                return JSONResponse(
                    {"error": "/metrics needs the metrics_token as a bearer token"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return Response(await metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.post("/_proxy/feeds/poll", response_model=None)
    async def feeds_poll(request: Request) -> dict[str, Any] | JSONResponse:
        """Poll the update feeds now (every upstream, or ``upstream=NAME``) and say what was
        purged; an upstream another process is polling at the moment answers ``busy``."""
        if feeds is None:
            return JSONResponse(
                {"error": "the update feeds are off (update_poll_seconds, offline, cache)"},
                status_code=404,
            )
        names = list(feeds.states)
        for name, value in request.query_params.multi_items():
            if name != "upstream":
                return JSONResponse(
                    {"error": f"unknown parameter {name[:40]}: the accepted one is upstream"},
                    status_code=400,
                )
            if value not in feeds.states:
                return JSONResponse(
                    {"error": f"no upstream {value[:40]!r}: give one of {', '.join(names)}"},
                    status_code=400,
                )
            names = [value]
        if cache is None or cache.unavailable is not None:
            raise StarletteHTTPException(503, "the cache is unavailable")
        polled = {}
        for name in names:
            result = dict(await feeds.poll(name, force=True))
            result.pop("next_poll_at", None)
            if "retry_after" in result:
                result["retry_after"] = math.ceil(result["retry_after"])
            polled[name] = result
        waits = [r["retry_after"] for r in polled.values() if r["outcome"] == "too_soon"]
        if len(waits) == len(polled):  # nothing was asked: say when to come back
            return JSONResponse(
                {
                    "error": "the update feeds were asked less than update_forced_poll_seconds "
                    "ago: try again later",
                    "upstreams": polled,
                },
                status_code=429,
                headers={"Retry-After": str(min(waits))},
            )
        return {"upstreams": polled}

    async def _ask_collection_series(
        store: BinaryStore, known: dict[str, set[str]], collection: str
    ) -> None:
        """Add to ``known`` the series each upstream's getSeries lists for ``collection``, when
        some kept files belong to no collection the gateway has seen (a purge by collection
        should not leave a series' file because nobody asked for its collection's list)."""
        running = series() if series is not None else None
        if running is None:
            return
        seen = set().union(*known.values())
        if not await asyncio.to_thread(store.without_collection, seen):
            return
        for upstream in upstreams:
            listed = await running.collection_series(upstream, collection)
            if listed:
                known.setdefault(collection, set()).update(listed)

    @app.delete("/_proxy/cache", response_model=None)
    async def cache_purge(request: Request) -> dict[str, int] | JSONResponse:
        """Delete the entries and kept files matching all the given filters (path,
        collection, series), or everything: no parameter at all, or ``all=true``."""
        if cache is None:
            raise StarletteHTTPException(404, "the cache is disabled")
        try:
            filters = purge_filters(request.query_params.multi_items())
        except ClientError as exc:
            return JSONResponse(exc.to_json(), status_code=exc.status)
        if cache.unavailable is not None:
            raise StarletteHTTPException(503, f"the cache is unavailable: {cache.unavailable}")
        try:
            known: dict[str, set[str]] = {}
            if binaries is not None and "collection" in filters:
                # Through the writer: after the answers it has queued, before the purge.
                job = cache.writer.submit(lambda: series_by_collection(cache.store.engine))
                known = await asyncio.wrap_future(job)
                await _ask_collection_series(binaries, known, filters["collection"])
            entries, size = await cache.purge(**filters)
            kept = (
                {}
                if binaries is None
                else await asyncio.to_thread(purge_binaries, binaries, filters, known)
            )
        except Exception as exc:
            if is_disk_full(exc):
                advice = "purge everything (no filters) or free" if filters else "free"
                message = f"the cache's disk is full: {advice} some space"
                raise StarletteHTTPException(507, message) from exc
            raise StarletteHTTPException(503, f"cache database: {describe_failure(exc)}") from exc
        return {"purged_entries": entries, "purged_bytes": size, **kept}

    return app

"""Assembling the gateway: upstreams, tokens, cache, the raw hot path and the control app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import swagger_ui_bundle  # type: ignore[import-untyped]
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy import make_url
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy import stop_deadline
from proxy.access import Access
from proxy.accounts.directory import Directory
from proxy.accounts.fairness import UserLimits
from proxy.accounts.lockout import Lockout
from proxy.accounts.registry import Registry
from proxy.audit import AUDIT_FILE, AuditLog
from proxy.binary.files import BinaryStore, directory_for
from proxy.cache.store import CacheStore
from proxy.cache.tiers import CacheSettings, TieredCache
from proxy.client_tokens import ClientTokens, read_secret_file, signing_key
from proxy.config import Settings
from proxy.control import control_app
from proxy.datadir import keep_private, prepare, sqlite_file
from proxy.db import (
    database_url,
    describe_failure,
    is_current,
    is_unreachable,
    make_engine,
    migrate,
)
from proxy.feeds.ledger import Ledger
from proxy.feeds.poller import FeedPoller
from proxy.gateway import Gateway
from proxy.metrics import Metrics, Sharing, shared_dir
from proxy.shield.counters import ShieldCounters
from proxy.shield.retry import RetryPolicy
from proxy.shield.shared import (
    BreakerSync,
    Leases,
    SharedAccounts,
    SharedFills,
    SharedFlights,
    SharedLimits,
    SharedStore,
)
from proxy.status import StatusBoard
from proxy.store_health import StoreHealth
from proxy.upstream import Upstream, upstream_configs

log = logging.getLogger("nbia_proxy.app")


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
    cache_clock: Callable[[], float] = time.time,
) -> Gateway:
    """Build the ASGI app for ``settings``. ``transport`` and the clocks are test seams.

    Nothing touches the network or the database until the app's lifespan starts.
    """
    counters = ShieldCounters()
    upstreams = [
        Upstream(config, settings, transport=transport, clock=clock, counters=counters)
        for config in upstream_configs(settings)
    ]
    # One view of the database for the cache, the kept files and the accounts: an outage
    # found by any of them spares the others the wait.
    health = StoreHealth(settings.database_timeout_seconds, settings.database_retry_seconds)
    cache = build_cache(settings, cache_clock, health) if settings.cache_enabled else None
    access = build_access(settings, cache_clock, health)
    binaries = build_binaries(settings, cache_clock, health) if cache is not None else None

    def relay_uncached() -> None:
        gateway.relay_uncached()

    audit_log = build_audit_log(settings)
    feeds = build_feeds(settings, upstreams, cache, binaries, cache_clock)
    metrics = build_metrics(settings, counters, upstreams, access, cache)
    if metrics is not None:
        metrics.binary = binaries
        metrics.feeds = feeds
    board = StatusBoard(tally=counters.tally if metrics is not None else None)
    shared = build_shared(settings, counters, upstreams, access)
    lifespan = _lifespan(
        settings,
        upstreams,
        cache,
        access,
        relay_uncached,
        audit_log,
        metrics,
        binaries,
        feeds,
        board,
        shared,
    )
    control = control_app(
        upstreams,
        cache,
        counters,
        access,
        lifespan,
        settings,
        metrics,
        binaries,
        lambda: gateway.series,
        feeds,
        board,
    )
    add_offline_docs(control)
    gateway = Gateway(
        settings,
        upstreams,
        access,
        control,
        cache,
        counters,
        audit_log,
        metrics=bool(metrics),
        binaries=binaries,
        transfers=board.transfers,
    )
    if gateway.series is not None:
        gateway.series.fills.on_failure = counters.tally.validation_failed
    if shared is not None:
        lease = settings.shared_lease_seconds
        if gateway.cached is not None:
            flights = SharedFlights(Leases(shared.store, "flight", lease))
            gateway.cached.shield.coalescer.across = flights
        if gateway.series is not None:
            gateway.series.fills.across = SharedFills(Leases(shared.store, "fill", lease))
    return gateway


class Shared:
    """The shared store of a deployment and the breakers that follow it."""

    def __init__(self, store: SharedStore, breakers: list[tuple[BreakerSync, Upstream]]):
        self.store = store
        self.breakers = breakers

    def start(self) -> None:
        for sync, upstream in self.breakers:
            sync.follow(upstream.breaker)

    async def aclose(self) -> None:
        for sync, _ in self.breakers:
            await sync.aclose()
        await self.store.aclose()


def build_shared(
    settings: Settings, counters: ShieldCounters, upstreams: list[Upstream], access: Access
) -> Shared | None:
    """With ``redis_url``: limits, lockouts and breakers shared through Redis (else None)."""
    if not settings.redis_url:
        return None
    store = SharedStore(
        settings.redis_url, settings.redis_prefix, settings.redis_timeout_seconds, counters
    )
    lease = settings.shared_lease_seconds
    for upstream in upstreams:
        upstream.limiter.shared = SharedLimits(
            store, upstream.name, settings.upstream_max_concurrency, lease
        )
    accounts = SharedAccounts(store, lease)
    access.limits.shared = accounts
    access.lockout.shared = accounts
    return Shared(store, [(BreakerSync(store, u.name), u) for u in upstreams])


#: Where /docs takes swagger-ui's files from (served by the gateway: no CDN).
DOCS_ASSETS = "/docs/assets/"
_DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def add_offline_docs(app: FastAPI) -> None:
    """``/docs``, FastAPI's swagger-ui page, with its script, style and icon served by the
    gateway from the ``swagger-ui-bundle`` package: a lab gateway may have no internet, and
    the page must not load code from a third party into an admin's browser."""
    directory = Path(swagger_ui_bundle.swagger_ui_path)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        assert app.openapi_url is not None
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - control endpoints",
            swagger_js_url=DOCS_ASSETS + "swagger-ui-bundle.js",
            swagger_css_url=DOCS_ASSETS + "swagger-ui.css",
            swagger_favicon_url=DOCS_ASSETS + "favicon-32x32.png",
        )

    @app.get(DOCS_ASSETS + "{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        media_type = _DOCS_FILES.get(name)  # these three only: never a path from the request
        if media_type is None:
            raise StarletteHTTPException(404)
        return FileResponse(
            directory / name, media_type=media_type, headers={"cache-control": "max-age=86400"}
        )


def build_binaries(
    settings: Settings, clock: Callable[[], float] = time.time, health: StoreHealth | None = None
) -> BinaryStore | None:
    """The series cache's kept files on the cache's database (not yet started), if enabled."""
    if not settings.binary_cache_enabled:
        return None
    url = database_url(settings.database_url, settings.data_dir)
    store = BinaryStore(
        make_engine(url, settings.database_timeout_seconds),
        directory_for(settings),
        settings.binary_cache_max_bytes,
        clock=clock,
        direct_writes=settings.binary_direct_writes,
    )
    if health is not None:
        store.health = health
    return store


def build_feeds(
    settings: Settings,
    upstreams: list[Upstream],
    cache: TieredCache | None,
    binaries: BinaryStore | None,
    clock: Callable[[], float] = time.time,
) -> FeedPoller | None:
    """The update-feed poller (not yet started): None when off, offline or without a cache."""
    if cache is None or settings.offline or settings.update_poll_seconds <= 0:
        return None
    return FeedPoller(
        upstreams,
        cache,
        binaries,
        Ledger(cache.store.engine),
        interval=settings.update_poll_seconds,
        token_on_v4=settings.token_on_v4,
        retry=RetryPolicy(settings.retry_max_attempts, settings.retry_budget_seconds),
        forced_min_seconds=settings.update_forced_poll_seconds,
        clock=clock,
    )


def build_metrics(
    settings: Settings,
    counters: ShieldCounters,
    upstreams: list[Upstream],
    access: Access,
    cache: TieredCache | None,
) -> Metrics | None:
    """What ``/metrics`` shows (None when off); with several workers, added up across them."""
    if not settings.metrics_enabled:
        return None
    sharing = Sharing(shared_dir(settings.data_dir)) if settings.workers > 1 else None
    return Metrics(counters, upstreams, access, cache, sharing)


def build_audit_log(settings: Settings) -> AuditLog:
    """The audit log the settings ask for: a file (by default in the data dir), stderr, off."""
    target: Path | str | None = settings.audit_log
    if target is None:
        target = settings.data_dir / AUDIT_FILE
    elif target == "":
        target = None
    return AuditLog(target, settings.audit_format)


def describe(settings: Settings, upstreams: list[Upstream], audit_log: AuditLog) -> str:
    """What is in effect, in one line for the start-up log (no secrets)."""
    mounted = ", ".join(f"{u.name} {u.config.url} at {u.config.mount or '/'}" for u in upstreams)
    url = make_url(database_url(settings.database_url, settings.data_dir))
    uses_database = settings.cache_enabled or settings.access == "accounts"
    database = url.render_as_string(hide_password=True) if uses_database else "none"
    # Where the kept binaries are: binary_dir may be a shared volume away from the data dir.
    series_cache = "off"
    if settings.binary_cache_enabled and settings.cache_enabled:
        series_cache = str(directory_for(settings).resolve())
    shared_store = "off (limits per process)"
    if settings.redis_url:
        # Host and prefix only: the URL may hold a password.
        shared_store = (
            f"redis {urlsplit(settings.redis_url).hostname}, prefix {settings.redis_prefix}"
        )
    return (
        f"upstreams: {mounted}; data dir {settings.data_dir.resolve()}; database {database}; "
        f"access {settings.access}; offline {'on' if settings.offline else 'off'}; "
        f"workers {settings.workers}; cache {'on' if settings.cache_enabled else 'off'}; "
        f"series cache {series_cache}; audit log {audit_log.describe()}; "
        f"shared store {shared_store}"
    )


def build_access(
    settings: Settings, clock: Callable[[], float] = time.time, health: StoreHealth | None = None
) -> Access:
    """Open access, or lab accounts on the configured database (loaded when the app starts).

    Gateway tokens carry wall-clock times, so that every worker and replica reads them alike.
    """
    tokens = ClientTokens(settings.client_token_lifetime_seconds, clock)
    url = database_url(settings.database_url, settings.data_dir)
    timeout = settings.database_timeout_seconds
    if settings.access == "open":
        # With a database (the cache's), workers and replicas share the token secret and ended
        # sessions, so a token from one is good at another; without one, each process signs
        # with a random secret of its own.
        shared = Registry(make_engine(url, timeout), clock) if settings.cache_enabled else None
        return Access(tokens, registry=shared)
    registry = Registry(make_engine(url, timeout), clock)
    directory = Directory(registry, health)
    tokens.authority = directory
    return Access(
        tokens,
        directory,
        registry,
        Lockout(settings.login_free_failures, settings.login_lockout_max_seconds),
        UserLimits(settings.user_rate_per_second, settings.user_max_downloads),
    )


def token_key(settings: Settings, registry: Registry) -> bytes:
    """The key that signs this gateway's tokens: from the ``token_secret_file`` if set, else
    from the secret in the database, bound to the access mode and the deployment."""
    if settings.token_secret_file is not None:
        keep_private(settings.token_secret_file, owner="the token_secret_file is yours")
        secret = read_secret_file(settings.token_secret_file)
    else:
        secret = registry.token_secret()
        url = database_url(settings.database_url, settings.data_dir)
        if settings.access == "accounts" and sqlite_file(url) is None:
            log.warning(
                "the token-signing secret is kept in the database's gateway_secrets table: "
                "whoever can read it can sign an admin token; set token_secret_file to keep "
                "the secret out of the database"
            )
    return signing_key(secret, settings.access, registry.deployment_id())


def build_cache(
    settings: Settings, clock: Callable[[], float] = time.time, health: StoreHealth | None = None
) -> TieredCache:
    """The tiered cache on the configured database (not yet started)."""
    url = database_url(settings.database_url, settings.data_dir)
    if health is None:
        health = StoreHealth(settings.database_timeout_seconds, settings.database_retry_seconds)
    return TieredCache(
        CacheStore(make_engine(url, settings.database_timeout_seconds)),
        CacheSettings(
            max_bytes=settings.cache_max_bytes,
            memory_bytes=settings.cache_memory_bytes,
            recheck_seconds=settings.cache_recheck_seconds,
            keep_expired_seconds=settings.cache_keep_expired_seconds,
            min_free_disk_bytes=settings.cache_min_free_disk_bytes,
        ),
        clock,
        health,
    )


def _open_database(settings: Settings, cache: TieredCache | None) -> None:
    """Bring the schema up to date and start the cache's writer (which checks it can write)."""
    prepare(settings)  # the data dir 0700 and the SQLite files 0600, before SQLite makes them
    url = database_url(settings.database_url, settings.data_dir)
    # Alembic is only loaded when there is something to do: a lean serving process.
    if settings.auto_migrate and not is_current(url):
        migrate(url)
    if cache is not None:
        cache.start()


def _go_without_database(
    settings: Settings,
    cache: TieredCache | None,
    access: Access,
    exc: Exception,
    relay_uncached: Callable[[], None],
) -> None:
    """Open mode on a database it cannot use (full disk, read-only, broken): relay uncached."""
    where = make_url(database_url(settings.database_url, settings.data_dir))
    reason = describe_failure(exc)
    log.warning(
        "the cache database %s cannot be used (%s): relaying every request uncached "
        "(X-Cache: BYPASS) until a restart finds it usable",
        where.render_as_string(hide_password=True),
        reason,
    )
    if cache is not None:
        cache.unavailable = reason
        relay_uncached()
    if access.registry is not None:  # tokens are then signed with this process's own secret
        access.registry.engine.dispose()
        access.registry = None


def _lifespan(
    settings: Settings,
    upstreams: list[Upstream],
    cache: TieredCache | None,
    access: Access,
    relay_uncached: Callable[[], None],
    audit_log: AuditLog,
    metrics: Metrics | None = None,
    binaries: BinaryStore | None = None,
    feeds: FeedPoller | None = None,
    board: StatusBoard | None = None,
    shared: Shared | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = binaries
        _open_audit_log(settings, audit_log)
        log.info("nbia-proxy starting: %s", describe(settings, upstreams, audit_log))
        reopening = _reopen_on_sighup(audit_log)
        if cache is not None or access.registry is not None:
            try:
                await asyncio.to_thread(_open_database, settings, cache)
            except Exception as exc:
                if access.accounts:
                    raise  # lab accounts cannot be checked without their database
                _go_without_database(settings, cache, access, exc, relay_uncached)
                if store is not None:
                    store.engine.dispose()
                    store = None
        if store is not None:
            # Sweeps what interrupted fills left; a store that cannot write relays (counted).
            await asyncio.to_thread(store.start)
        refresher = None
        health = cache.health if cache is not None else None
        if access.directory is not None:
            health = access.directory.health
        if access.registry is not None:
            access.tokens.use_secret(await asyncio.to_thread(token_key, settings, access.registry))
            if access.directory is not None:
                await asyncio.to_thread(access.directory.load)
            refresher = asyncio.create_task(
                _refresh_accounts(
                    access, access.registry, settings.accounts_refresh_seconds, health
                )
            )
        sharing = None
        if metrics is not None and metrics.sharing is not None:
            sharing = asyncio.create_task(metrics.share())
        polling = None
        if feeds is not None and cache is not None and cache.unavailable is None:
            polling = asyncio.create_task(feeds.run())
        sampling = None
        if board is not None:
            board.watch_logs()
            board.sample()  # the first minute starts now
            sampling = asyncio.create_task(board.sample_every())
        if shared is not None:
            shared.start()
        try:
            yield
        finally:
            stop_deadline.begin()  # in a served process: a cleanup that sticks ends it anyway
            if shared is not None:
                await shared.aclose()
            if polling is not None:
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
            if sampling is not None:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            if board is not None:
                board.unwatch_logs()
            if sharing is not None:
                sharing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sharing
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            for upstream in upstreams:
                await upstream.aclose()
            if store is not None:
                await asyncio.to_thread(store.close)
                # Its SQLite connections must not outlive the gateway (they hold the WAL open).
                await asyncio.to_thread(store.engine.dispose)
            if cache is not None:
                await asyncio.to_thread(cache.close)
            if access.registry is not None:
                await asyncio.to_thread(access.registry.engine.dispose)
            if reopening:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            audit_log.close()  # the lines of every request answered, on a clean stop
            if metrics is not None:
                metrics.last_write()  # a worker's totals stay in the others' sums

    return lifespan


def _open_audit_log(settings: Settings, audit_log: AuditLog) -> None:
    """Open the audit log at start, so that a path it cannot write fails the start."""
    if settings.audit_log is None:  # the default place: the data dir, made private
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        audit_log.open()
    except OSError as exc:
        raise RuntimeError(f"cannot open the audit log {audit_log.target}: {exc}") from exc


def _reopen_on_sighup(audit_log: AuditLog) -> bool:
    """Reopen the audit log on SIGHUP (logrotate's signal); False where signals cannot be
    handled (off the main thread, as in the tests' in-process servers)."""
    if not audit_log.on:
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, audit_log.reopen)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


async def _refresh_accounts(
    access: Access, registry: Registry, every: float, health: StoreHealth | None
) -> None:
    """Share ended sessions with other replicas and pick up theirs and any user changes."""
    while True:
        await asyncio.sleep(every)
        ended = access.tokens.take_newly_ended()
        try:
            while ended:
                await asyncio.to_thread(registry.end_session, *ended[0])
                ended.pop(0)
            access.tokens.learn_ended(await asyncio.to_thread(registry.ended_sessions))
            if access.directory is not None:
                await asyncio.to_thread(access.directory.load)
        except Exception as exc:
            # The previous snapshot stays in force; the next round tries again, and sessions
            # not yet written are kept for it.
            access.tokens.keep_unwritten(ended)
            if health is not None and is_unreachable(exc):
                health.failed("accounts", exc)  # logged once per outage, no traceback
            else:
                log.exception("could not re-read the lab accounts")
        else:
            if health is not None:
                health.succeeded()

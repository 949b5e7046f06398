"""Assembling the gateway: upstreams, tokens, cache, the raw hot path and the control app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
from fastapi import FastAPI
from sqlalchemy import make_url

from proxy.access import Access
from proxy.accounts.directory import Directory
from proxy.accounts.fairness import UserLimits
from proxy.accounts.lockout import Lockout
from proxy.accounts.registry import Registry
from proxy.binary.files import BinaryStore, directory_for
from proxy.cache.store import CacheStore
from proxy.cache.tiers import CacheSettings, TieredCache
from proxy.client_tokens import ClientTokens, read_secret_file, signing_key
from proxy.config import Settings
from proxy.control import control_app
from proxy.datadir import keep_private, prepare, sqlite_file
from proxy.db import database_url, describe_failure, is_current, make_engine, migrate
from proxy.gateway import Gateway
from proxy.shield.counters import ShieldCounters
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
    cache = build_cache(settings, cache_clock) if settings.cache_enabled else None
    access = build_access(settings, cache_clock)
    binaries = build_binaries(settings, cache_clock) if cache is not None else None

    def relay_uncached() -> None:
        gateway.relay_uncached()

    lifespan = _lifespan(settings, upstreams, cache, access, relay_uncached, binaries)
    control = control_app(upstreams, cache, counters, access, lifespan)
    gateway = Gateway(settings, upstreams, access, control, cache, counters, binaries)
    return gateway


def build_binaries(
    settings: Settings, clock: Callable[[], float] = time.time
) -> BinaryStore | None:
    """The series cache's kept files on the cache's database (not yet started), if enabled."""
    if not settings.binary_cache_enabled:
        return None
    url = database_url(settings.database_url, settings.data_dir)
    return BinaryStore(
        make_engine(url), directory_for(settings), settings.binary_cache_max_bytes, clock=clock
    )


def build_access(settings: Settings, clock: Callable[[], float] = time.time) -> Access:
    """Open access, or lab accounts on the configured database (loaded when the app starts).

    Gateway tokens carry wall-clock times, so that every worker and replica reads them alike.
    """
    tokens = ClientTokens(settings.client_token_lifetime_seconds, clock)
    url = database_url(settings.database_url, settings.data_dir)
    if settings.access == "open":
        # With a database (the cache's), workers and replicas share the token secret and ended
        # sessions, so a token from one is good at another; without one, each process signs
        # with a random secret of its own.
        return Access(
            tokens, registry=Registry(make_engine(url), clock) if settings.cache_enabled else None
        )
    registry = Registry(make_engine(url), clock)
    directory = Directory(registry)
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


def build_cache(settings: Settings, clock: Callable[[], float] = time.time) -> TieredCache:
    """The tiered cache on the configured database (not yet started)."""
    url = database_url(settings.database_url, settings.data_dir)
    return TieredCache(
        CacheStore(make_engine(url)),
        CacheSettings(
            max_bytes=settings.cache_max_bytes,
            memory_bytes=settings.cache_memory_bytes,
            recheck_seconds=settings.cache_recheck_seconds,
            keep_expired_seconds=settings.cache_keep_expired_seconds,
            min_free_disk_bytes=settings.cache_min_free_disk_bytes,
        ),
        clock,
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
    binaries: BinaryStore | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = binaries
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
        if access.registry is not None:
            access.tokens.use_secret(await asyncio.to_thread(token_key, settings, access.registry))
            if access.directory is not None:
                await asyncio.to_thread(access.directory.load)
            refresher = asyncio.create_task(
                _refresh_accounts(access, access.registry, settings.accounts_refresh_seconds)
            )
        try:
            yield
        finally:
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

    return lifespan


async def _refresh_accounts(access: Access, registry: Registry, every: float) -> None:
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
        except Exception:
            # The previous snapshot stays in force; the next round tries again, and sessions
            # not yet written are kept for it.
            access.tokens.keep_unwritten(ended)
            log.exception("could not re-read the lab accounts")

"""Assembling the gateway: upstreams, tokens, cache, the raw hot path and the control app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
from fastapi import FastAPI

from proxy.cache.store import CacheStore
from proxy.cache.tiers import CacheSettings, TieredCache
from proxy.client_tokens import ClientTokens
from proxy.config import Settings
from proxy.control import control_app
from proxy.db import database_url, is_current, make_engine, migrate
from proxy.gateway import Gateway
from proxy.shield import ShieldCounters
from proxy.upstream import Upstream, upstream_configs


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
    control = control_app(upstreams, cache, counters, _lifespan(settings, upstreams, cache))
    tokens = ClientTokens(settings.client_token_lifetime_seconds, clock)
    return Gateway(settings, upstreams, tokens, control, cache, counters)


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
        ),
        clock,
    )


def _lifespan(
    settings: Settings, upstreams: list[Upstream], cache: TieredCache | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if cache is not None:
            url = database_url(settings.database_url, settings.data_dir)
            # Alembic is only loaded when there is something to do: a lean serving process.
            if settings.auto_migrate and not await asyncio.to_thread(is_current, url):
                await asyncio.to_thread(migrate, url)
            await asyncio.to_thread(cache.start)
        try:
            yield
        finally:
            for upstream in upstreams:
                await upstream.aclose()
            if cache is not None:
                await asyncio.to_thread(cache.close)

    return lifespan

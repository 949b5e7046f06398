"""Assembling the gateway: upstreams, token registry, the raw hot path and the control app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy import __version__
from proxy.client_tokens import ClientTokens
from proxy.config import Settings
from proxy.gateway import Gateway
from proxy.upstream import Upstream, upstream_configs


def create_app(
    settings: Settings,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Gateway:
    """Build the ASGI app for ``settings``. ``transport`` and ``clock`` are test seams."""
    upstreams = [
        Upstream(config, settings, transport=transport, clock=clock)
        for config in upstream_configs(settings)
    ]
    control = _control_app(upstreams)
    return Gateway(
        settings, upstreams, ClientTokens(settings.client_token_lifetime_seconds, clock), control
    )


def _control_app(upstreams: list[Upstream]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for upstream in upstreams:
            await upstream.aclose()

    app = FastAPI(title="nbia-proxy", version=__version__, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "not found" if exc.status_code == 404 else str(exc.detail).lower()
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        """Liveness: the gateway process answers. Upstream health is not checked here."""
        return {
            "status": "ok",
            "version": __version__,
            "upstreams": {u.name: {"mount": u.config.mount or "/"} for u in upstreams},
        }

    return app

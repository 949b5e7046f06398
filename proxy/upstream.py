"""Named upstreams: where each mount point's requests go, and with which service account."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookiejar import Cookie, CookieJar
from typing import Any

import httpx
from pydantic import SecretStr

from proxy import rawhttp
from proxy.config import Settings
from proxy.errors import transport_error
from proxy.http1 import Http1Transport, new_ssl_context
from proxy.service_token import ServiceToken
from proxy.shield.breaker import Breaker, is_failure_status
from proxy.shield.counters import ShieldCounters
from proxy.shield.limiter import Limiter
from proxy.shield.prober import Prober

log = logging.getLogger("nbia_proxy.upstream")

#: What the gateway asks an upstream whose circuit is open: the list of collection names. It
#: works on every NBIA server without a token (v4 answers anonymously), is one small indexed
#: query (a few KB, the call every tcia-utils session starts with), has no side effect (unlike
#: the token endpoint, which would log in, or downloads, which TCIA records), and it goes
#: through the application, not just the web server in front of it (unlike a bare TCP
#: connect). The answer is neither cached nor counted as client traffic.
PROBE_PATH = b"/nbia-api/services/v4/getCollectionValues"


class NoCookies(CookieJar):
    """A cookie jar that keeps nothing: the upstream client is shared by every user."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One NBIA server: its name, the path prefix it is mounted at, and its account."""

    name: str
    mount: str  # "" for the root mount, "/nlst" for NLST; never ends with "/"
    url: str
    username: str
    password: SecretStr


def upstream_configs(settings: Settings) -> list[UpstreamConfig]:
    """The configured upstreams, longest mount first so that ``/nlst`` wins over ``/``."""
    configs = [
        UpstreamConfig("nbia", "", settings.upstream, settings.username, settings.password),
        UpstreamConfig(
            "nlst",
            "/nlst",
            settings.nlst_upstream,
            settings.nlst_username or settings.username,
            settings.nlst_password or settings.password,
        ),
    ]
    return sorted(configs, key=lambda c: len(c.mount), reverse=True)


class Upstream:
    """A configured upstream with its HTTP connection pool and service token."""

    def __init__(
        self,
        config: UpstreamConfig,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        counters: ShieldCounters | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.base_url = httpx.URL(config.url)
        self._base_path = self.base_url.raw_path.split(b"?", 1)[0].rstrip(b"/")
        self.timeout = httpx.Timeout(
            connect=settings.connect_timeout_seconds,
            read=settings.read_timeout_seconds,
            write=settings.read_timeout_seconds,
            pool=settings.connect_timeout_seconds,
        )
        limit = settings.max_upstream_connections
        # Two pools of proxy.http1 connections on one TLS context (one trust store, loaded
        # once): binary bodies stream through rawhttp (see proxy.forwarding) with no cap of
        # their own, so a slow multi-GB relay never holds a connection the metadata client,
        # capped at ``limit``, is waiting for.
        tls = new_ssl_context()
        self.raw = rawhttp.Client(tls, max_idle=limit)
        self.client = httpx.AsyncClient(
            # Kept-alive connections parsed in C: half of what a cache miss costs otherwise.
            transport=transport or Http1Transport(limit, ssl_context=tls),
            # One client speaks for every user: a cookie the upstream sets for one request
            # (Tomcat's JSESSIONID) must not ride along with the next user's.
            cookies=NoCookies(),
            timeout=self.timeout,
            limits=httpx.Limits(
                max_connections=limit,
                max_keepalive_connections=limit,
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self.token = ServiceToken(
            client=self.client,
            token_url=str(self.base_url.join("/nbia-api/oauth/token")),
            upstream=config.name,
            username=config.username,
            password=config.password,
            client_id=settings.client_id,
            refresh_margin_seconds=settings.token_refresh_margin_seconds,
            clock=clock,
        )

        counters = counters or ShieldCounters()
        # The limiter sleeps in real time, so it always reads the real clock.
        self.limiter = Limiter(
            config.name,
            settings.upstream_max_concurrency,
            settings.upstream_rate_per_second,
            settings.upstream_queue_timeout_seconds,
            counters,
        )
        self.breaker = Breaker(
            config.name,
            settings.circuit_failure_threshold,
            settings.circuit_cooldown_seconds,
            counters,
            clock,
        )
        self.prober = Prober(self.breaker, self.probe, first=settings.circuit_probe_seconds)
        self.breaker.listener = self.prober.wake
        # A probe slower than the longest pause between probes counts as failed: the next one
        # starts at once rather than after the full read time-out.
        patience = max(1.0, settings.circuit_cooldown_seconds)
        self._probe_timeout = httpx.Timeout(
            min(settings.read_timeout_seconds, patience),
            connect=min(settings.connect_timeout_seconds, patience),
        )

    def target_for(self, raw_path: bytes, query: bytes) -> bytes:
        """The request target (path and query) the upstream receives for a client path below
        the mount and its raw query, bytes kept."""
        return self._base_path + raw_path + (b"?" + query if query else b"")

    def url_for(self, raw_path: bytes, query: bytes) -> httpx.URL:
        """The upstream URL for a client path (below the mount) and raw query, bytes kept."""
        return self.base_url.copy_with(raw_path=self.target_for(raw_path, query))

    async def probe(self) -> bool:
        """One cheap anonymous read (:data:`PROBE_PATH`): True when the upstream answers with
        anything but 502/503/504 (a 4xx still shows a working application)."""
        url = self.url_for(PROBE_PATH, b"")
        try:
            response = await self.client.get(url, timeout=self._probe_timeout)
        except httpx.HTTPError as exc:
            log.debug("probe: %s", transport_error(exc, self.name).message)
            return False
        log.debug("probe of upstream %s: %d", self.name, response.status_code)
        return not is_failure_status(response.status_code, slow=False)

    async def aclose(self) -> None:
        await self.prober.aclose()
        await self.client.aclose()
        await self.raw.aclose()

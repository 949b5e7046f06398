"""The gateway's request path: a raw ASGI app in front of the FastAPI control app.

One request, top to bottom (:meth:`Gateway.__call__`), each step a call into the module named
after it:

1. route to an upstream by mount (else the control app: ``/healthz``, ``/readyz``,
   ``/_proxy/...``);
2. answer the gateway's own endpoints, token and logout (:mod:`proxy.token_endpoints`);
3. admit the request (:mod:`proxy.access`);
4. answer a repeat from memory (:mod:`proxy.hit_memo`, :mod:`proxy.cache.answer`);
5. check the request and read its body (:mod:`proxy.request_body`), classify the endpoint
   (:mod:`proxy.endpoints`, :mod:`proxy.cache.shape`);
6. a cacheable request is decided (:mod:`proxy.cache.decision`) and served from the store or
   fetched, coalesced and shielded (:mod:`proxy.cache.serving`); a binary download goes to the
   series cache (:mod:`proxy.binary.serving`); anything else is forwarded
   (:mod:`proxy.forwarding`) and relayed (:mod:`proxy.streaming`);
7. record it (:mod:`proxy.audit`); a failure becomes the gateway's short JSON error
   (:mod:`proxy.errors`).
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy import audit
from proxy.access import Access, Principal, Refusal
from proxy.audit import ABORTED
from proxy.binary.files import BinaryStore
from proxy.binary.serving import SeriesCache
from proxy.cache.answer import send_stored, stored_answer
from proxy.cache.serving import (
    CachedAnswers,
    CachePolicy,
    cache_key,
    forwarded_head_size,
)
from proxy.cache.shape import Fit, classify, classify_download
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.config import Settings
from proxy.endpoints import Endpoint, lookup, token_use_for
from proxy.errors import ClientError, GatewayError, StreamBroken
from proxy.forwarding import Forwarding, OutgoingRequest, within
from proxy.headers import check_forwardable, for_client
from proxy.metrics import METRICS_PATH, Tally, bearer_matches, endpoint_class
from proxy.request_body import read_body
from proxy.responses import ZERO_COPY, send_bytes, send_error, send_refusal
from proxy.shield.coalescer import Coalescer
from proxy.shield.counters import ShieldCounters
from proxy.shield.policy import ShieldPolicy
from proxy.shield.retry import RetryPolicy
from proxy.status import Transfers
from proxy.streaming import read_bounded, relay_stream, uncached_marks
from proxy.token_endpoints import answer_local, local_endpoint
from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.gateway")

_API_PREFIX = "/nbia-api/"
_PROBES = frozenset({"/healthz", "/readyz"})
_FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


class Gateway:
    """Routes NBIA paths to their upstream; hands the rest to ``control_app``."""

    def __init__(
        self,
        settings: Settings,
        upstreams: list[Upstream],
        access: Access,
        control_app: ASGIApp,
        cache: TieredCache | None = None,
        counters: ShieldCounters | None = None,
        audit_log: audit.AuditLog = audit.OFF,
        *,
        metrics: bool = False,
        binaries: BinaryStore | None = None,
        transfers: Transfers | None = None,
    ) -> None:
        counters = counters or ShieldCounters()
        self.settings = settings
        self.audit = audit_log
        #: Where each request is counted for /metrics (None: metrics off).
        self.tally: Tally | None = counters.tally if metrics else None
        #: Whether a request's end is recorded at all (audit line or metrics).
        self.observed = audit_log.on or metrics
        self.cache = cache
        self.counters = counters
        self.forwarding = Forwarding(
            offline=settings.offline,
            deadline_seconds=settings.request_deadline_seconds,
            token_on_v4=settings.token_on_v4,
            retry=RetryPolicy(settings.retry_max_attempts, settings.retry_budget_seconds),
        )
        shield = ShieldPolicy(
            coalescer=Coalescer(counters),
            counters=counters,
            max_stale_seconds=settings.cache_max_stale_seconds,
            revalidate_seconds=settings.cache_stale_while_revalidate_seconds,
        )
        policy = CachePolicy(
            ttl_overrides=tuple(settings.cache_ttl.items()),
            negative_ttl_seconds=settings.cache_negative_ttl_seconds,
            token_on_v4=settings.token_on_v4,
            max_body_bytes=settings.max_cached_body_bytes,
        )
        self.cached = (
            None if cache is None else CachedAnswers(cache, policy, shield, self.forwarding)
        )
        self.series = (
            None
            if binaries is None or self.cached is None
            else SeriesCache(
                binaries,
                self.forwarding,
                self.cached,
                token_on_v4=settings.token_on_v4,
                background=settings.binary_fill_in_background,
                max_error_bytes=settings.max_cached_body_bytes,
                max_background_fills=settings.binary_max_background_fills,
            )
        )
        # Longest mount first, so /nlst/... is not taken by the root mount.
        self.upstreams = sorted(upstreams, key=lambda u: len(u.config.mount), reverse=True)
        self.access = access
        self.control_app = control_app
        self.shortcut_hits = 0  # hits answered by proxy.hit_protocol without ASGI
        #: The downloads in progress, for the status page.
        self.transfers = transfers or Transfers()

    def relay_uncached(self) -> None:
        """Stop using the cache (its database is unusable): every request then takes the
        BYPASS path, as with the cache off."""
        self.cache = None
        self.cached = None
        self.series = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control_app(scope, receive, send)
            return
        # From the request's first byte, as the protocol saw it (else from now).
        started: float = scope.get(audit.STARTED) or time.perf_counter()
        routed = self._route(scope["path"])
        if routed is None:
            await self._control(scope, receive, send, started)
            return
        upstream, path = routed
        local = local_endpoint(path)
        if local is not None:
            timeout = self.settings.read_timeout_seconds
            status = await answer_local(
                local, self.access, _client(scope), timeout, scope, receive, send
            )
            if self.observed:  # never the query: a legacy token request may carry a password
                self._record("-", scope, status, "-", 0, started, query="", below_mount=path)
            return
        admitted = await self.access.check(scope["headers"], _client(scope))
        if isinstance(admitted, Refusal):
            await send_refusal(send, admitted)
            self._record("-", scope, admitted.status, "-", 0, started, below_mount=path)
            return
        entry = self._repeat(scope)
        if entry is not None:
            assert self.cache is not None
            await send_stored(send, stored_answer(self.cache, entry))
            if self.observed:
                user = self.access.audit_name(admitted, scope["headers"]) if self.audit.on else ""
                self.record_hit(
                    user, _client(scope), scope["path"], scope["query_string"], entry, started
                )
            return
        progress = audit.Progress()
        transfer = self._transfer(admitted, scope, path, progress)
        try:
            await self._exchange(upstream, path, admitted, scope, receive, progress.watch(send))
        except StreamBroken:
            progress.broken = True
            raise  # the server must abort the connection: the client sees a broken transfer
        except Exception as exc:
            progress.broken = True
            await _answer_failure(exc, scope["method"], path, progress, progress.watch(send))
            progress.broken = progress.started  # answered with an error: no broken transfer
        except BaseException:
            progress.broken = True  # cancelled (at shutdown)
            raise
        finally:
            if transfer is not None:
                self.transfers.end(transfer)
            if self.observed:
                user = self.access.audit_name(admitted, scope["headers"]) if self.audit.on else ""
                self._record(
                    user,
                    scope,
                    progress.status,
                    progress.cache,
                    progress.size,
                    started,
                    progress.outcome(ABORTED in scope),
                    below_mount=path,
                )

    def _transfer(
        self, admitted: Principal, scope: Scope, path: str, progress: audit.Progress
    ) -> int | None:
        """Note a binary download for the status page (None for anything else)."""
        endpoint = lookup(path)
        if endpoint is None or not endpoint.payload.is_binary:
            return None
        user = self.access.audit_name(admitted, scope["headers"])
        return self.transfers.begin(user, _client(scope), path, scope["query_string"], progress)

    def _route(self, path: str) -> tuple[Upstream, str] | None:
        """The upstream whose mount ``path`` is below, and the path below the mount."""
        for upstream in self.upstreams:
            mount = upstream.config.mount
            if path.startswith(mount + _API_PREFIX):
                return upstream, path[len(mount) :]
        return None

    async def _control(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """The gateway's own endpoints: all but the probes (``/healthz``, ``/readyz``) need an
        admin in accounts mode."""
        user = "-"
        if self.access.accounts and scope["path"] not in _PROBES and not self._scraper(scope):
            admitted = await self.access.check(scope["headers"], _client(scope), admin=True)
            if isinstance(admitted, Refusal):
                await send_refusal(send, admitted)
                self._record("-", scope, admitted.status, "-", 0, started)
                return
            user = admitted.name
        if not self.observed:
            await self.control_app(scope, receive, send)
            return
        progress = audit.Progress()
        try:
            await self.control_app(scope, receive, progress.watch(send))
        except BaseException:
            progress.broken = True
            raise
        finally:
            outcome = progress.outcome(ABORTED in scope)
            self._record(user, scope, progress.status, "-", progress.size, started, outcome)

    def _scraper(self, scope: Scope) -> bool:
        """Whether this is Prometheus asking for ``/metrics`` with the ``metrics_token``."""
        token = self.settings.metrics_token
        if token is None or scope["path"] != METRICS_PATH:
            return False
        return bearer_matches(scope["headers"], token.get_secret_value())

    def _repeat(self, scope: Scope) -> Entry | None:
        """The fresh stored answer to a plain GET this gateway has answered before, if any."""
        if self.cached is None or scope["method"] != "GET":
            return None
        return self.cached.memo.fresh(scope["path"], scope["query_string"], scope["headers"])

    async def _exchange(
        self,
        upstream: Upstream,
        path: str,
        principal: Principal,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Classify the request, then serve it through the cache or forward it."""
        request = await self._incoming(upstream, path, scope, receive)
        endpoint = lookup(path)
        fit = self._fit(upstream, endpoint, request)
        if (
            endpoint is not None
            and endpoint.cacheable
            and fit >= Fit.CACHED
            and self.cached is not None
        ):
            key = cache_key(upstream, endpoint, request, self.settings.token_on_v4)
            self.cached.memo.remember(
                scope["path"], scope["query_string"], request.method, request.body, key
            )
            await self.cached.serve(upstream, endpoint, request, key, fit, receive, send)
            return
        if endpoint is None or endpoint.payload.is_binary:
            # A download holds one of its user's slots (accounts mode), so one user's many
            # threads queue behind each other instead of in front of everyone else. A fill the
            # client leaves going on alone takes the slot over until it ends.
            async with self.access.limits.download(principal.name) as slot:
                if endpoint is not None and self.series is not None:
                    await self.series.serve(
                        upstream,
                        endpoint,
                        request,
                        fit,
                        receive,
                        send,
                        lambda: self._relay(upstream, path, endpoint, request, receive, send),
                        slot,
                        zero_copy=ZERO_COPY in scope.get("extensions", {}),
                    )
                    return
                await self._relay(upstream, path, endpoint, request, receive, send)
        else:
            await self._relay(upstream, path, endpoint, request, receive, send)

    async def _incoming(
        self, upstream: Upstream, path: str, scope: Scope, receive: Receive
    ) -> OutgoingRequest:
        """The client's request as it will go upstream, checked, with its body read."""
        method: str = scope["method"]
        # The upstream (and httpx's URL normaliser) would resolve these; refuse, not guess.
        if any(segment in (".", "..") for segment in path.split("/")):
            raise ClientError("dot segments are not allowed in paths")
        if method not in _FORWARDED_METHODS:
            raise ClientError(f"method {method} is not supported", status=405)
        check_forwardable(scope["headers"])  # the client's 400 before the cache or coalescing
        mount = upstream.config.mount.encode()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(mount + b"/"):
            raise ClientError("malformed request path")
        body = await read_body(
            scope["headers"],
            receive,
            self.settings.max_request_body_bytes,
            self.settings.read_timeout_seconds,
        )
        return OutgoingRequest(
            method=method,
            raw_path=raw_path[len(mount) :],
            query=scope["query_string"],
            headers=list(scope["headers"]),
            body=body,
        )

    def _fit(self, upstream: Upstream, endpoint: Endpoint | None, request: OutgoingRequest) -> Fit:
        """How far the cache key describes the request: the metadata cache's key, or for a
        binary download the series cache's (an unknown endpoint is never cached); a request
        NBIA would misread is the client's 400."""
        if endpoint is None:
            return Fit.UNCACHED
        head = forwarded_head_size(upstream, request)
        kind = classify_download if endpoint.payload.is_binary else classify
        verdict = kind(endpoint, request.method, request.query, request.body, request.headers, head)
        if verdict.fit is Fit.REFUSED:
            raise ClientError(verdict.reason)
        return verdict.fit

    async def _relay(
        self,
        upstream: Upstream,
        path: str,
        endpoint: Endpoint | None,
        request: OutgoingRequest,
        receive: Receive,
        send: Send,
    ) -> None:
        """Forward an uncached request and relay its answer: catalogued text read whole (up to
        the bound), binaries and unknown endpoints streamed as they arrive."""
        buffer = endpoint is not None and not endpoint.payload.is_binary
        # Reads may be retried after 429/503; side effects and unknown POSTs never are.
        read = request.method in ("GET", "HEAD") if endpoint is None else not endpoint.side_effect
        async with within(self.forwarding.deadline(), upstream.name):
            response = await self.forwarding.open(
                upstream, request, token_use_for(path), read=read, bulk=not buffer
            )
        extra = uncached_marks(response)
        if buffer and request.method in ("GET", "POST"):
            # Held whole only up to the bound; a larger text answer is relayed as it arrives.
            body = await read_bounded(response, upstream.name, self.settings.max_cached_body_bytes)
            if isinstance(body, bytes):
                kept = for_client(response.headers.raw)
                await send_bytes(send, response.status_code, body, kept + extra)
                return
            await relay_stream(response, upstream.name, receive, send, extra, body)
        else:
            await relay_stream(response, upstream.name, receive, send, extra)

    def record_hit(
        self, user: str, client: str, path: str, query: bytes, entry: Entry, started: float
    ) -> None:
        """The audit line and metrics of a hit answered from memory (also by the protocol
        shortcut)."""
        if self.tally is not None:
            self.tally.hit(entry.status, len(entry.body), time.perf_counter() - started)
        if not self.audit.on:
            return
        self.audit.record(
            user=user,
            client=client,
            method="GET",
            path=path,
            query=audit.public_query(query),
            status=entry.status,
            cache="HIT",
            size=len(entry.body),
            started=started,
        )

    def _record(
        self,
        user: str,
        scope: Scope,
        status: int,
        cache: str,
        size: int,
        started: float,
        outcome: str = "ok",
        *,
        query: str | None = None,
        below_mount: str | None = None,
    ) -> None:
        """Count the request and write its audit line; ``below_mount`` is its path below the
        upstream's mount (None: one of the gateway's own paths)."""
        if self.tally is not None:
            self.tally.request(
                endpoint_class(below_mount),
                scope["method"],
                status,
                cache,
                size,
                time.perf_counter() - started,
                outcome,
            )
        if self.audit.on:
            self.audit.record(
                user=user,
                client=_client(scope),
                method=scope["method"],
                path=scope["path"],
                query=audit.public_query(scope["query_string"]) if query is None else query,
                status=status,
                cache=cache,
                size=size,
                started=started,
                outcome=outcome,
            )


async def _answer_failure(
    exc: Exception, method: str, path: str, progress: audit.Progress, send: Send
) -> None:
    """Answer a failed request with the gateway's JSON error, unless the answer had started
    (then the exception goes on, and the server aborts the connection)."""
    if isinstance(exc, GatewayError):
        log.warning("%s %s -> %s: %s", method, path, exc.status, exc.message)
        if not progress.started:
            await send_error(send, exc.status, exc.message, exc.upstream, exc.retry_after)
        return
    log.exception("unexpected error on %s %s", method, path, exc_info=exc)
    if progress.started:
        raise exc
    await send_error(send, 500, "internal gateway error")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"

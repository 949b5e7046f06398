"""The gateway's hot path: a raw ASGI app in front of the FastAPI control app.

Every request whose path (below an upstream's mount) starts with ``/nbia-api/`` is handled here
without framework routing: the token endpoints are answered locally, everything else is
forwarded to the upstream under the same path. Other paths (``/healthz``, ``/_proxy/...``)
fall through to the control app.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import audit
from proxy.access import Access, Principal, Refusal
from proxy.cache.policy import CacheKey
from proxy.cache.serving import (
    CachePolicy,
    cache_key,
    forwarded_head_size,
    send_hit,
    serve_cacheable,
)
from proxy.cache.shape import Fit, classify
from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.client_tokens import TokenAnswer
from proxy.config import Settings
from proxy.endpoints import LOGOUT_PATHS, TOKEN_PATHS, lookup, token_use_for
from proxy.errors import ClientError, GatewayError, StreamBroken, UpstreamTimeout
from proxy.forwarding import OutgoingRequest, open_shielded
from proxy.headers import check_forwardable, find, for_client
from proxy.responses import GATEWAY_MADE, send_bytes, send_error, send_json
from proxy.shield.coalescer import Coalescer
from proxy.shield.counters import ShieldCounters
from proxy.shield.policy import ShieldPolicy
from proxy.shield.retry import RetryPolicy
from proxy.streaming import read_bounded, relay_stream, uncached_marks
from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.gateway")

_API_PREFIX = "/nbia-api/"
_SLOW_PATH_HEADERS = frozenset(
    {b"cache-control", b"pragma", b"content-length", b"transfer-encoding"}
)
_KNOWN_KEYS_LIMIT = 20_000
_KNOWN_QUERY_MAX = 1024  # longer queries take the full path every time
_SLASHES = re.compile("/+")
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
    ) -> None:
        counters = counters or ShieldCounters()
        self.settings = settings
        self.cache = cache
        self.counters = counters
        self.shield = ShieldPolicy(
            coalescer=Coalescer(counters),
            counters=counters,
            retry=RetryPolicy(settings.retry_max_attempts, settings.retry_budget_seconds),
            max_stale_seconds=settings.cache_max_stale_seconds,
            deadline_seconds=settings.request_deadline_seconds,
            offline=settings.offline,
            revalidate_seconds=settings.cache_stale_while_revalidate_seconds,
        )
        self.cache_policy = CachePolicy(
            ttl_overrides=tuple(settings.cache_ttl.items()),
            negative_ttl_seconds=settings.cache_negative_ttl_seconds,
            token_on_v4=settings.token_on_v4,
            max_body_bytes=settings.max_cached_body_bytes,
        )
        # Longest mount first, so /nlst/... is not taken by the root mount.
        self.upstreams = sorted(upstreams, key=lambda u: len(u.config.mount), reverse=True)
        self.access = access
        self.control_app = control_app
        self._known_keys: dict[tuple[str, bytes], CacheKey] = {}
        self.shortcut_hits = 0  # hits answered by proxy.hit_protocol without ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.control_app(scope, receive, send)
            return
        started = time.perf_counter()
        routed = self._route(scope["path"])
        if routed is None:
            await self._control(scope, receive, send, started)
            return
        upstream, path = routed
        # Tomcat treats /oauth/token/, //oauth/token and the like as the token endpoint: so
        # must we, or a client's credentials would be forwarded upstream.
        local = _SLASHES.sub("/", path).rstrip("/").lower()
        if local in TOKEN_PATHS or local in LOGOUT_PATHS:
            await self._local(local in TOKEN_PATHS, scope, receive, send, started)
            return
        admitted = self.access.check(scope["headers"], _client(scope))
        if isinstance(admitted, Refusal):
            await self._refuse(admitted, scope, send, started)
            return
        if self.cache is not None and scope["method"] == "GET":
            entry = self.fresh_entry(scope["path"], scope["query_string"], scope["headers"])
            if entry is not None:
                await send_hit(self.cache, entry, send)
                if audit.enabled():
                    user = self.access.audit_name(admitted, scope["headers"])
                    self.audit_hit(user, _client(scope), scope["path"], entry, started)
                return
        state = _Progress()
        try:
            await self._handle(upstream, path, admitted, scope, receive, _tracking(send, state))
        except GatewayError as exc:
            log.warning("%s %s -> %s: %s", scope["method"], path, exc.status, exc.message)
            if not state.started:
                await send_error(send, exc.status, exc.message, exc.upstream, exc.retry_after)
            state.status = exc.status
        except StreamBroken:
            raise  # the server must abort the connection: the client sees a broken transfer
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], path)
            if not state.started:
                await send_error(send, 500, "internal gateway error")
                state.status = 500
            else:
                raise
        finally:
            if audit.enabled():
                user = self.access.audit_name(admitted, scope["headers"])
                _audit(user, scope, state.status, state.cache, state.size, started)

    def audit_hit(self, user: str, client: str, path: str, entry: Entry, started: float) -> None:
        """The audit line of a hit answered without the full path."""
        audit.record(
            user=user,
            client=client,
            method="GET",
            path=path,
            status=entry.status,
            cache="HIT",
            size=len(entry.body),
            started=started,
        )

    async def _control(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        """The gateway's own endpoints: all but ``/healthz`` need an admin in accounts mode."""
        if self.access.accounts and scope["path"] != "/healthz":
            admitted = self.access.check(scope["headers"], _client(scope), admin=True)
            if isinstance(admitted, Refusal):
                await self._refuse(admitted, scope, send, started)
                return
        await self.control_app(scope, receive, send)

    async def _local(
        self, is_token: bool, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        """The token and logout endpoints, answered by the gateway itself."""
        address = _client(scope)
        try:
            if is_token:
                answer = await self._answer_token(scope, receive)
                # A locked-out address still logs in with valid credentials; wrong ones get 429.
                refusal = self.access.login_failed(address) if answer.status == 401 else None
                if refusal is not None:
                    await self._refuse(refusal, scope, send, started)
                    return
            else:
                auth = find(scope["headers"], b"authorization")
                answer = self.access.tokens.answer_logout(auth.decode("latin-1") if auth else None)
        except ClientError as exc:
            await send_error(send, exc.status, exc.message)
            answer = TokenAnswer(exc.status, None)
        else:
            await _send_answer(send, answer)
        if audit.enabled():
            _audit("-", scope, answer.status, "-", 0, started)

    async def _refuse(self, refusal: Refusal, scope: Scope, send: Send, started: float) -> None:
        challenge = (
            [(b"www-authenticate", b'Bearer realm="nbia-proxy"')] if refusal.challenge else []
        )
        # Rounded up: a client told to come back must not come back before the lockout ends.
        wait = None if refusal.retry_after is None else math.ceil(refusal.retry_after)
        await send_error(send, refusal.status, refusal.message, None, wait, challenge)
        if audit.enabled():
            _audit("-", scope, refusal.status, "-", 0, started)

    def fresh_entry(
        self, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Entry | None:
        """The hit path: a GET seen before, answered from memory without parsing anything.

        ``_known_keys`` maps the raw request (path with mount, query bytes) to the cache key that
        the full path computed for it; only plain GETs without a body are recorded there.
        """
        key = self._known_keys.get((path, query))
        if key is None:
            return None
        for name, _ in headers:
            # A body, or a client asking for a fresh answer, takes the full path.
            if name in _SLOW_PATH_HEADERS:
                return None
        assert self.cache is not None
        entry = self.cache.from_memory(key.digest)
        if entry is None or entry.expires_at <= self.cache.clock():
            return None
        return entry

    def _remember_key(self, scope: Scope, request: OutgoingRequest, key: CacheKey) -> None:
        if request.method != "GET" or request.body or len(request.query) > _KNOWN_QUERY_MAX:
            return
        if len(self._known_keys) >= _KNOWN_KEYS_LIMIT:
            self._known_keys.clear()  # crude but bounded; the full path refills it
        self._known_keys[(scope["path"], scope["query_string"])] = key

    def _route(self, path: str) -> tuple[Upstream, str] | None:
        for upstream in self.upstreams:
            mount = upstream.config.mount
            if path.startswith(mount + _API_PREFIX):
                return upstream, path[len(mount) :]
        return None

    async def _handle(
        self,
        upstream: Upstream,
        path: str,
        principal: Principal,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        method: str = scope["method"]
        _reject_dot_segments(path)
        if method not in _FORWARDED_METHODS:
            raise ClientError(f"method {method} is not supported", status=405)
        check_forwardable(scope["headers"])  # the client's 400 before the cache or coalescing
        mount = upstream.config.mount.encode()
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if not raw_path.startswith(mount + b"/"):
            raise ClientError("malformed request path")
        request = OutgoingRequest(
            method=method,
            raw_path=raw_path[len(mount) :],
            query=scope["query_string"],
            headers=list(scope["headers"]),
            body=await self._read_body(scope, receive),
        )
        endpoint = lookup(path)
        if endpoint is not None:
            verdict = classify(
                endpoint,
                method,
                request.query,
                request.body,
                request.headers,
                forwarded_head_size(upstream, request),
            )
            if verdict.fit is Fit.REFUSED:
                raise ClientError(verdict.reason)
            if self.cache is not None and verdict.fit >= Fit.CACHED:
                key = cache_key(upstream, endpoint, request, self.settings.token_on_v4)
                self._remember_key(scope, request, key)
                await serve_cacheable(
                    self.cache,
                    self.cache_policy,
                    self.shield,
                    upstream,
                    endpoint,
                    request,
                    key,
                    verdict.fit,
                    receive,
                    send,
                )
                return
        if self.settings.offline:
            raise UpstreamTimeout("offline and not cached", upstream=upstream.name)
        # Catalogued text payloads are read whole; binaries and unknown endpoints stream.
        buffer = endpoint is not None and not endpoint.payload.is_binary
        # Reads may be retried after 429/503; side effects and unknown POSTs never are.
        read = method in ("GET", "HEAD") if endpoint is None else not endpoint.side_effect
        if buffer:
            await self._forward(upstream, path, request, read, buffer, receive, send)
            return
        # A download holds one of its user's slots (accounts mode), so one user's many
        # threads queue behind each other instead of in front of everyone else.
        async with self.access.limits.download(principal.name):
            await self._forward(upstream, path, request, read, buffer, receive, send)

    async def _forward(
        self,
        upstream: Upstream,
        path: str,
        request: OutgoingRequest,
        read: bool,
        buffer: bool,
        receive: Receive,
        send: Send,
    ) -> None:
        try:
            async with asyncio.timeout(self.settings.request_deadline_seconds):
                response = await open_shielded(
                    upstream,
                    request,
                    token_use_for(path),
                    self.settings.token_on_v4,
                    bulk=not buffer,
                    retry=self.shield.retry if read else None,
                )
        except TimeoutError as exc:
            message = "no answer within the request deadline"
            raise UpstreamTimeout(message, upstream=upstream.name) from exc
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

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, refused early when too large and bounded in time."""
        limit = self.settings.max_request_body_bytes
        declared = find(scope["headers"], b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise ClientError(f"request body larger than {limit} bytes", status=413)
        try:
            async with asyncio.timeout(self.settings.read_timeout_seconds):
                return await _read_body(receive, limit)
        except TimeoutError:
            raise ClientError("request body not received in time", status=408) from None

    async def _answer_token(self, scope: Scope, receive: Receive) -> TokenAnswer:
        method = scope["method"]
        body = await _read_body(receive, 64 * 1024)
        if method == "POST":
            form = _form(body)
        elif method == "GET":  # tcia-utils 1.0 sent the grant as a query string
            form = _form(scope["query_string"])
        else:
            raise ClientError(f"method {method} is not supported here", status=405)
        return self.access.tokens.answer_token_request(form)


class _Progress:
    """What has been sent so far, for the audit log and for not answering twice."""

    __slots__ = ("cache", "size", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.cache = "-"
        self.size = 0


def _tracking(send: Send, state: _Progress) -> Send:
    async def tracked(message: Message) -> None:
        if message["type"] == "http.response.start":
            state.started = True
            state.status = message["status"]
            for name, value in message["headers"]:
                if name == b"x-cache":
                    state.cache = value.decode("latin-1")
        else:
            state.size += len(message.get("body", b""))
        await send(message)

    return tracked


def _audit(user: str, scope: Scope, status: int, cache: str, size: int, started: float) -> None:
    audit.record(
        user=user,
        client=_client(scope),
        method=scope["method"],
        path=scope["path"],
        status=status,
        cache=cache,
        size=size,
        started=started,
    )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "-"


def _reject_dot_segments(path: str) -> None:
    # The upstream (and httpx's URL normaliser) would resolve these; refuse rather than guess.
    if any(segment in (".", "..") for segment in path.split("/")):
        raise ClientError("dot segments are not allowed in paths")


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientError("client disconnected", status=499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body larger than {limit} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _form(raw: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise ClientError("form body is not valid UTF-8") from exc
    return dict(pairs)


async def _send_answer(send: Send, answer: TokenAnswer) -> None:
    if answer.body is None:  # 204: no body, and no Content-Length either (RFC 9110 §8.6)
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": GATEWAY_MADE}
        )
        await send({"type": "http.response.body", "body": b""})
    else:
        await send_json(send, answer.status, answer.body, GATEWAY_MADE)

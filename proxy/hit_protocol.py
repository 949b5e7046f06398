"""uvicorn's httptools protocol with a shortcut for cache hits.

For every request uvicorn builds an ASGI scope, a request/response cycle and an asyncio task;
for a cache hit that bookkeeping costs several times more than the answer itself. This protocol
answers a plain keep-alive ``GET`` that the gateway has answered before, and whose stored copy
is fresh in memory, straight from the parser callback with one ``transport.write``. Anything
else (a miss, a body, ``no-cache``, pipelining, HTTP/1.0, an upgrade, a percent-encoded path)
goes down uvicorn's ordinary path unchanged.
"""

from __future__ import annotations

import http
import time
from typing import Any, TypeVar

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy import audit
from proxy.cache.store import Entry
from proxy.gateway import Gateway

_WRITE_BUFFER_LIMIT = 256 * 1024
_Wrapped = TypeVar("_Wrapped")


def _unwrap(app: Any, kind: type[_Wrapped]) -> _Wrapped | None:
    """The ``kind`` inside uvicorn's middleware wrappers, if any."""
    for _ in range(10):
        if isinstance(app, kind):
            return app
        app = getattr(app, "app", None)
    return None


def find_gateway(app: Any) -> Gateway | None:
    """The Gateway inside uvicorn's middleware wrappers, if any."""
    return _unwrap(app, Gateway)


def status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


def response_head(entry: Entry) -> bytes:
    """Status line and stored headers (with Content-Length), computed once per entry."""
    if entry.wire_head is None:
        lines = [status_line(entry.status)]
        lines += [name + b": " + value + b"\r\n" for name, value in entry.wire_headers]
        entry.wire_head = b"".join(lines)
    return entry.wire_head


class HitProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that writes fresh cache hits without an ASGI round trip."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gateway = find_gateway(self.app)
        self._answered = False  # the current request was answered by the shortcut
        # uvicorn's X-Forwarded-For handling, present only when trusted_proxies names some.
        proxy_headers = _unwrap(self.app, ProxyHeadersMiddleware)
        self._trusted = proxy_headers.trusted_hosts if proxy_headers else None
        self._peer = "-"
        self._peer_trusted = False
        # httptools (llhttp) puts no bound on the request head: this protocol does.
        self._head_limit = self._gateway.settings.max_header_bytes if self._gateway else 0
        self._head_size = 0
        self._refused = False  # the head was too large: answered 431, connection closing
        # When an idle keep-alive connection is to be closed; None while a request is under way.
        self._idle_deadline: float | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self.client:
            self._peer = str(self.client[0])
            self._peer_trusted = self._trusted is not None and self._peer in self._trusted

    def on_message_begin(self) -> None:
        # uvicorn builds the ASGI scope here (a dict, and a copy of the app state) for every
        # request; a shortcut hit never reads it, so _start_message builds it only when needed.
        self.url = b""
        self.headers = []
        self.expect_100_continue = False
        self._head_size = 0

    def _start_message(self) -> None:
        """Run uvicorn's ``on_message_begin`` now, keeping what the parser already delivered."""
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect_100_continue
        self.headers.extend(headers)  # the list the new scope holds

    def on_url(self, url: bytes) -> None:
        if self._grow_head(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._grow_head(len(name) + len(value) + 4):
            super().on_header(name, value)

    def _grow_head(self, size: int) -> bool:
        """Count head bytes; past the limit, answer 431 once and close the connection."""
        if self._refused:
            return False
        self._head_size += size
        if not self._head_limit or self._head_size <= self._head_limit:
            return True
        self._refused = True
        body = b'{"error":"request head larger than %d bytes"}' % self._head_limit
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()
        return False

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        answer = self._hit() if self._gateway is not None else None
        if answer is None:
            self._start_message()
            super().on_headers_complete()
            return
        self._answered = True
        self.transport.write(answer)
        # What uvicorn does after a response: count it, re-arm keep-alive, resume reading.
        self.on_response_complete()

    # Keep-alive: uvicorn cancels its timer on every read and starts a new one after every
    # response, a timer churn per request. Here one timer stays armed and, when it fires, checks
    # the deadline the last response set, re-arming itself for the time left.

    def _unset_keepalive_if_required(self) -> None:
        self._idle_deadline = None

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            # Rare: uvicorn's own version starts the next pipelined request (arming no timer).
            super().on_response_complete()
            return
        # uvicorn's version for the common case, with the timer above.
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self._idle_deadline = self.loop.time() + self.timeout_keep_alive
        if self.timeout_keep_alive_task is None:
            self._arm_keepalive(self.timeout_keep_alive)

    def _arm_keepalive(self, delay: float) -> None:
        self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_deadline is None:
            return  # a request is under way; its response sets a new deadline
        left = self._idle_deadline - self.loop.time()
        if left > 0:
            self._arm_keepalive(left)
        else:
            super().timeout_keep_alive_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()  # it would keep this protocol alive until then
            self.timeout_keep_alive_task = None

    def on_body(self, body: bytes) -> None:
        if not (self._answered or self._refused):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        if self._answered:
            self._answered = False
            return
        super().on_message_complete()

    def _hit(self) -> bytes | None:
        parser = self.parser
        if (
            parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            # A client that sends but does not read gets uvicorn's backpressure, not ours.
            or self.flow.write_paused
            or self.transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT
        ):
            return None
        url = httptools.parse_url(self.url)
        raw_path: bytes = url.path
        if b"%" in raw_path:
            return None  # the gateway keys on the decoded path; let uvicorn decode it
        try:
            path = self.root_path + raw_path.decode("ascii")
        except UnicodeDecodeError:
            return None
        gateway = self._gateway
        assert gateway is not None
        cache = gateway.cache
        client = self._forwarded_client() if self._peer_trusted else self._peer
        principal = gateway.access.quick_principal(self.headers, client)
        if principal is None:
            return None  # no valid credentials: the full path writes the refusal
        entry = gateway.fresh_entry(path, url.query or b"", self.headers)
        if entry is None or cache is None:
            return None
        if gateway.access.limits.admit(principal.name, count=False):
            return None  # over the user's rate: the full path refuses (and counts) it
        age = max(0, int(cache.clock() - entry.created_at))
        cache.count(entry.endpoint, hit=True)
        cache.served(entry.digest)
        gateway.shortcut_hits += 1
        if audit.enabled():
            user = gateway.access.audit_name(principal, self.headers)
            gateway.audit_hit(user, client, path, entry, time.perf_counter())
        return b"%sx-cache: HIT\r\nage: %d\r\n\r\n%s" % (response_head(entry), age, entry.body)

    def _forwarded_client(self) -> str:
        """The client behind a trusted proxy, read as uvicorn's middleware reads it for the
        ASGI path, so that lockout and audit see the same address on both paths."""
        assert self._trusted is not None
        forwarded = [value for name, value in self.headers if name == b"x-forwarded-for"]
        if not forwarded:
            return self._peer
        host, _ = self._trusted.get_trusted_client_address(b", ".join(forwarded).decode("latin-1"))
        return host or self._peer

"""uvicorn's httptools protocol, bounded, with a shortcut for cache hits.

Bounds, so that no client holds the gateway (all per process):

* the request head (request line and headers) may not exceed ``max_header_bytes``, counted while
  it arrives (httptools gathers an unfinished header line without limit): beyond it, 431 and the
  connection is closed;
* it must be complete within ``header_timeout_seconds`` of the connection's opening or of the
  request's first byte: else 408 (or, for a connection that sent nothing, just a close);
* a client address may hold ``max_connections_per_client`` connections; more are answered 503
  and closed at once (a trusted proxy speaks for many clients and is not capped);
* at shutdown, a transfer still running after ``shutdown_grace_seconds`` is aborted.

The shortcut: for every request uvicorn builds an ASGI scope, a request/response cycle and an
asyncio task; for a cache hit that bookkeeping costs several times more than the answer itself.
This protocol answers a plain keep-alive ``GET`` that the gateway has answered before, and
whose stored copy is fresh in memory, straight from the parser callback with one
``transport.write``. Anything else (a miss, a body, ``no-cache``, pipelining, HTTP/1.0, an
upgrade, a percent-encoded path) goes down uvicorn's ordinary path unchanged.

A repeat of a head it answered so (the very same bytes, arriving whole in one read while the
connection is idle, :class:`proxy.hit_memo.KnownHead`) is answered from those bytes without the
parser: the parser's per-header callbacks into Python cost more than the rest of such a hit.
Only the parse is skipped; the checks that depend on the moment (the connection's state, the
credentials, the user's rate, the stored copy's freshness) run for every request.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from asyncio import TimerHandle
from collections import Counter
from typing import Any, TypeVar, cast

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from proxy import audit
from proxy.cache.answer import status_line, stored_answer
from proxy.cache.store import Entry
from proxy.gateway import Gateway
from proxy.headers import RawHeaders
from proxy.hit_memo import KnownHead
from proxy.responses import ZERO_COPY
from proxy.zerocopy import ZeroCopy, offered

log = logging.getLogger("nbia_proxy.protocol")

_WRITE_BUFFER_LIMIT = 256 * 1024
_Wrapped = TypeVar("_Wrapped")


class ClientConnections:
    """Live connections per client address, for one server, and the cap on them."""

    def __init__(self) -> None:
        self._live: Counter[str] = Counter()
        self._refusing: set[str] = set()  # warned about, until one of its connections ends

    def admit(self, address: str, cap: int) -> bool:
        """Count a new connection from ``address``; False (and no count) when at the cap."""
        if self._live[address] < cap:
            self._live[address] += 1
            return True
        if address not in self._refusing:
            self._refusing.add(address)
            log.warning("%s holds %d connections; refusing more", address, cap)
        return False

    def release(self, address: str) -> None:
        """A counted connection from ``address`` has ended."""
        self._live[address] -= 1
        if self._live[address] <= 0:
            del self._live[address]
        self._refusing.discard(address)


#: Per server: in the gateway one per process, in the tests one per GatewayServer.
_CLIENTS: weakref.WeakKeyDictionary[ServerState, ClientConnections] = weakref.WeakKeyDictionary()


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


def error_answer(status: int, message: str) -> bytes:
    """A complete response in the gateway's error shape that ends the connection."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()
    return (
        b"%scontent-type: application/json\r\ncache-control: no-store\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (status_line(status), len(body), body)
    )


class HitProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that writes fresh cache hits without an ASGI round trip."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gateway = find_gateway(self.app)
        self._answered = False  # the current request was answered by the shortcut
        settings = self._gateway.settings if self._gateway else None
        # uvicorn's X-Forwarded-For handling, present only when trusted_proxies names some.
        proxy_headers = _unwrap(self.app, ProxyHeadersMiddleware)
        self._trusted = proxy_headers.trusted_hosts if proxy_headers else None
        self._head_limit = settings.max_header_bytes if settings else 0
        self._head_timeout = settings.header_timeout_seconds if settings else 0.0
        self._per_client = settings.max_connections_per_client if settings else 0
        self._grace = settings.shutdown_grace_seconds if settings else None
        self._peer = "-"
        self._peer_trusted = False
        self._counted = False  # this connection counts against its address's cap
        # The head of the current request: exact size of what the parser delivered, and raw
        # bytes received since the last request ended (the parser keeps an unfinished line
        # whole, so a line that never ends shows only here).
        self._head_size = 0
        self._head_bytes = 0
        self._in_head = False  # a request has begun and its head is not complete yet
        self._head_deadline: float | None = None
        self._head_timer: TimerHandle | None = None
        self._grace_timer: TimerHandle | None = None
        self._refused = False  # answered with an error by this protocol, connection closing
        # When an idle keep-alive connection is to be closed; None while a request is under way.
        self._idle_deadline: float | None = None
        self._began = 0.0  # perf_counter() at the current request's first byte, for its audit
        self._audited: tuple[str, str, str, bytes, Any] | None = None  # the hit to audit
        self._hit_entry: Entry | None = None  # a hit to count for /metrics (audit off)
        cached = self._gateway.cached if self._gateway is not None else None
        self._memo = cached.memo if cached is not None else None
        # Known heads: this read, while it may become one (a whole head at an idle moment);
        # the head the shortcut answered from it; how many requests began in it.
        self._candidate: bytes | None = None
        self._learnt: KnownHead | None = None
        self._begun = 0
        # The audit line's fixed parts for the last known head answered on this connection,
        # with what they were rendered for (head, entry, user, client).
        self._line_for: tuple[KnownHead, Entry, str, str] | None = None
        self._line: audit.LineParts = ("", "")
        self._zero_copy: ZeroCopy | None = None  # the file sends of a plain TCP connection

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if offered(self.scheme):
            self._zero_copy = ZeroCopy(self.loop, transport, self.flow)
        if self.client:
            self._peer = str(self.client[0])
            self._peer_trusted = self._trusted is not None and self._peer in self._trusted
        if self._per_client and self.client and not self._peer_trusted:
            clients = _CLIENTS.setdefault(self.server_state, ClientConnections())
            if not clients.admit(self._peer, self._per_client):
                self._refuse(503, "too many connections from this address")
                return
            self._counted = True
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._zero_copy is not None:
            self._zero_copy.lost()
        for timer in (self.timeout_keep_alive_task, self._head_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()  # it would keep this protocol alive until then
        self.timeout_keep_alive_task = self._head_timer = self._grace_timer = None
        if self._counted:
            self._counted = False
            _CLIENTS[self.server_state].release(self._peer)

    def data_received(self, data: bytes) -> None:
        memo = self._memo
        if memo is not None and not self._head_bytes and not self._in_head:
            # Idle: the parser has finished every request it was given and holds no byte of
            # the next. A head it parsed before, whole in this read, needs no parsing now.
            known = memo.heads.get(data)
            if known is not None and self._answer_known(known):
                return
            if data[-4:] == b"\r\n\r\n" and data.find(b"\r\n\r\n") == len(data) - 4:
                self._candidate = data  # one whole head, perhaps to be learnt below
        # uvicorn's version, inlined: this is the hot path, and calling it through super()
        # cost about 1 us per hit (4 % of a hit's time in this protocol), the bounds added
        # here almost nothing. Its keep-alive reset happens in on_message_begin instead.
        self._head_bytes += len(data)
        self._begun = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            # The parser now takes nothing more on this connection: nor does the shortcut.
            self._memo = None
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        finally:
            learnt, self._learnt = self._learnt, None
            candidate, self._candidate = self._candidate, None
        if (
            learnt is not None
            and memo is not None
            and self._begun == 1
            and not self._in_head
            and not self._head_bytes
        ):
            # The shortcut answered the one request this read held, and it ended the read.
            assert candidate is not None
            memo.learn(candidate, learnt)
        if self._in_head:  # this read left a head unfinished
            if self._head_deadline is None:
                self._await_head()
            if self._head_limit and self._head_bytes > self._head_limit:
                self._refuse_head()

    def _answer_known(self, known: KnownHead) -> bool:
        """Answer the request of a known head now if nothing stands in the way (else False:
        the parser takes the bytes as usual)."""
        if self._refused or not self._may_answer():
            return False
        self._began = time.perf_counter()
        if not self._write_known(known):
            return False
        # What the parser callbacks and uvicorn do for a request and its response.
        self._head_deadline = None
        self._idle_deadline = None
        self.on_response_complete()
        return True

    def on_message_begin(self) -> None:
        # uvicorn builds the ASGI scope here (a dict, and a copy of the app state) for every
        # request; a shortcut hit never reads it, so _start_message builds it only when needed.
        self.url = b""
        self.headers = []
        self.expect_100_continue = False
        self._head_size = 0
        self._begun += 1
        self._in_head = True
        self._began = time.perf_counter()
        # A request has begun: the connection is no longer idle. (uvicorn cancels keep-alive
        # on any read instead, so a client sending only blank lines was never timed out.)
        self._idle_deadline = None

    def _start_message(self) -> None:
        """Run uvicorn's ``on_message_begin`` now, keeping what the parser already delivered."""
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        scope = cast(dict[str, Any], self.scope)
        scope[audit.STARTED] = self._began
        if self._zero_copy is not None:
            scope["extensions"] = {ZERO_COPY: {}}
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
        self._refuse_head()
        return False

    def _refuse_head(self) -> None:
        self._refuse(431, f"request head larger than {self._head_limit} bytes")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error, once, and close the connection."""
        if self._refused:
            return
        self._refused = True
        self._in_head = False
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.write(error_answer(status, message))
            self.transport.close()
        gateway = self._gateway
        if gateway is not None and gateway.tally is not None:
            started = self._began or time.perf_counter()
            gateway.tally.request("unknown", "-", status, "-", 0, time.perf_counter() - started)
        if gateway is not None and gateway.audit.on:  # a refusal before any ASGI call
            gateway.audit.record(
                user="-",
                client=self._peer,
                method="-",
                path="-",
                query="",
                status=status,
                cache="-",
                size=0,
                started=self._began or time.perf_counter(),
            )

    # The header timeout: like the keep-alive timer below, one timer per connection that checks
    # a deadline when it fires, so a request whose head arrives in time costs no timer churn.

    def _await_head(self) -> None:
        """A request head is due within the header timeout from now."""
        if not self._head_timeout:
            return
        self._head_deadline = self.loop.time() + self._head_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._head_timeout, self._head_timer_fired)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        if self._head_deadline is None or self.transport.is_closing():
            return
        left = self._head_deadline - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_timer_fired)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._await_head()  # a response is still going out: the head's time starts after
            return
        self._head_deadline = None
        if self._in_head:
            log.debug("%s sent no complete request head in time", self._peer)
            self._refuse(408, "request head not received in time")
        else:
            self.transport.close()  # nothing was asked: nothing to answer

    def shutdown(self) -> None:
        """The server is stopping: idle connections close now, a transfer after the grace."""
        super().shutdown()
        if self._grace is not None and not self.transport.is_closing():
            self._grace_timer = self.loop.call_later(self._grace, self._abort_transfer)

    def _abort_transfer(self) -> None:
        self._grace_timer = None
        log.warning(
            "shutdown grace of %g s over: aborting the transfer to %s", self._grace, self._peer
        )
        if self.cycle is not None and not self.cycle.response_complete:
            cast(dict[str, Any], self.scope)[audit.ABORTED] = True  # for its audit line
        # Abort, not close: nothing buffered is flushed, no final chunk is written, so the body
        # ends short of its chunked end or its Content-Length: a broken transfer to the client.
        self.transport.abort()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._head_deadline = None
        answer = self._hit() if self._gateway is not None else None
        if answer is None:
            self._start_message()
            cycle = self.cycle
            super().on_headers_complete()
            if self._zero_copy is not None and self.cycle is not cycle:
                self._zero_copy.adopt(self.cycle)
            return
        self._answered = True
        self.transport.write(answer)
        if self._audited is not None:  # after the write: its duration ends at the last byte
            assert self._gateway is not None
            self._gateway.record_hit(*self._audited, self._began)
            self._audited = None
        elif self._hit_entry is not None:
            entry, self._hit_entry = self._hit_entry, None
            tally = self._gateway.tally if self._gateway is not None else None
            if tally is not None:
                tally.hit(entry.status, len(entry.body), time.perf_counter() - self._began)
        # What uvicorn does after a response: count it, re-arm keep-alive, resume reading.
        self.on_response_complete()

    # Keep-alive: uvicorn cancels its timer on every read and starts a new one after every
    # response, a timer churn per request. Here one timer stays armed and, when it fires, checks
    # the deadline the last response set, re-arming itself for the time left.

    def _unset_keepalive_if_required(self) -> None:
        pass  # on_message_begin ends the idle time; reads that begin no request do not

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            # Rare: uvicorn's own version starts the next pipelined request (arming no timer).
            super().on_response_complete()
            return
        # uvicorn's version for the common case, with the timer above.
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        if self._in_head:
            return  # the next request has begun: the header timeout watches it
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

    def on_body(self, body: bytes) -> None:
        if not (self._answered or self._refused):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._head_bytes = 0  # what follows in this read belongs to the next request
        if self._answered:
            self._answered = False
            return
        super().on_message_complete()

    def _may_answer(self) -> bool:
        """Whether the connection can take an answer written now."""
        return not (
            self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            # A client that sends but does not read gets uvicorn's backpressure, not ours.
            or self.flow.write_paused
            or self.transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT
            or self.transport.is_closing()
        )

    def _hit(self) -> bytes | None:
        parser = self.parser
        if (
            parser.get_method() != b"GET"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
            or not self._may_answer()
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
        cached = gateway.cached
        if cached is None:
            return None
        query: bytes = url.query or b""
        client = self._forwarded_client(self.headers) if self._peer_trusted else self._peer
        principal = gateway.access.quick_principal(self.headers, client)
        if principal is None:
            return None  # no valid credentials: the full path writes the refusal
        entry = cached.memo.fresh(path, query, self.headers)
        if entry is None:
            return None
        if gateway.access.limits.admit(principal.name, count=False):
            return None  # over the user's rate: the full path refuses (and counts) it
        if self._candidate is not None and self._begun == 1:
            self._learnt = KnownHead(path, query, self.headers, entry.digest)
        # It can answer now: with the same stored answer the ASGI path would send.
        answer = stored_answer(cached.cache, entry)
        gateway.shortcut_hits += 1
        if gateway.audit.on:  # its line (and metrics) recorded after the write
            user = gateway.access.audit_name(principal, self.headers)
            self._audited = (user, client, path, query, entry)
        elif gateway.tally is not None:  # metrics alone: the least work per hit
            self._hit_entry = entry
        return answer.wire()

    def _write_known(self, known: KnownHead) -> bool:
        """Write the answer to a known head's request and record it, if nothing stands in
        the way (the checks of :meth:`_hit` that do not depend on the parse)."""
        headers = known.headers
        gateway = self._gateway
        memo = self._memo
        assert gateway is not None and memo is not None
        access = gateway.access
        client = self._forwarded_client(headers) if self._peer_trusted else self._peer
        principal = access.quick_principal(headers, client)
        if principal is None:
            return False
        entry = memo.fresh_entry(known.digest)
        if entry is None or access.limits.admit(principal.name, count=False):
            return False
        # Counted before the write: whoever reads the answer may read the count at once.
        gateway.shortcut_hits += 1
        self.transport.write(memo.hit_answer(entry))
        # After the write: the duration ends at the last byte (what Gateway.record_hit does).
        size = len(entry.body)
        tally = gateway.tally
        if tally is not None:
            tally.hit(entry.status, size, time.perf_counter() - self._began)
        audit_log = gateway.audit
        if audit_log.on:
            user = access.audit_name(principal, headers)
            line_for = self._line_for
            if (
                line_for is None
                or line_for[0] is not known
                or line_for[1] is not entry
                or line_for[2] != user
                or line_for[3] != client
            ):
                self._line_for = (known, entry, user, client)
                self._line = audit_log.prepare(
                    user=user,
                    client=client,
                    method="GET",
                    path=known.path,
                    query=audit.public_query(known.query),
                    status=entry.status,
                    cache="HIT",
                    size=size,
                )
            audit_log.record_prepared(self._line, self._began)
        return True

    def _forwarded_client(self, headers: RawHeaders) -> str:
        """The client behind a trusted proxy, read as uvicorn's middleware reads it for the
        ASGI path, so that lockout and audit see the same address on both paths."""
        assert self._trusted is not None
        forwarded = [value for name, value in headers if name == b"x-forwarded-for"]
        if not forwarded:
            return self._peer
        host, _ = self._trusted.get_trusted_client_address(b", ".join(forwarded).decode("latin-1"))
        return host or self._peer

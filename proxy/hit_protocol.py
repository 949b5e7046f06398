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
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy import audit
from proxy.cache.store import Entry
from proxy.gateway import Gateway

_WRITE_BUFFER_LIMIT = 256 * 1024


def find_gateway(app: Any) -> Gateway | None:
    """The Gateway inside uvicorn's middleware wrappers, if any."""
    for _ in range(10):
        if isinstance(app, Gateway):
            return app
        app = getattr(app, "app", None)
    return None


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
        # httptools (llhttp) puts no bound on the request head: this protocol does.
        self._head_limit = self._gateway.settings.max_header_bytes if self._gateway else 0
        self._head_size = 0
        self._refused = False  # the head was too large: answered 431, connection closing

    def on_message_begin(self) -> None:
        self._head_size = 0
        super().on_message_begin()

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
            super().on_headers_complete()
            return
        self._answered = True
        self.transport.write(answer)
        # What uvicorn does after a response: count it, re-arm keep-alive, resume reading.
        self.on_response_complete()

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
        client = str(self.client[0]) if self.client else "-"
        principal = gateway.quick_principal(self.headers, client)
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

"""The audit log: one line per request, in a file of its own, written in batches.

A line says when (UTC), who (user, client address), what (method, path, query with secret
parameters masked; never the query of a token request, nor any header), the answer (status as
sent, cache result, body bytes), how long from the request's first byte to the answer's last
byte handed to the connection, and how the transfer ended: ``ok``, ``aborted`` (the gateway
broke it off: an upstream failure mid-body, an error after the answer began, shutdown) or
``abandoned`` (the client went away first).

Lines are rendered with plain string formatting (``json.dumps`` only for a value that needs
escaping) into a memory buffer, which is written with one ``os.write`` when it holds 64 KiB or
a second after its first line, at shutdown, and before the file is reopened (SIGHUP, for
logrotate). The file is opened ``O_APPEND``: each write of whole lines lands at the end of the
file in one piece, so the lines of several workers never interleave mid-line (true of regular
files on Linux's local file systems; a network file system may not promise it). A crash loses
at most the last second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from asyncio import TimerHandle
from contextvars import ContextVar
from pathlib import Path

from starlette.types import Message, Send

from proxy.responses import SENT, ZERO_COPY

log = logging.getLogger("nbia_proxy.audit")

#: The scope key under which the protocol passes the ``perf_counter`` reading of the request's
#: first byte, and the one it sets when it aborts the transfer at shutdown.
STARTED = "nbia_proxy.started"
ABORTED = "nbia_proxy.aborted"

#: Set in a request's task when it joined another request's upstream fetch (the coalescer):
#: its answer says ``X-Cache: MISS``, its audit line ``JOINED``.
JOINED: ContextVar[bool] = ContextVar("nbia_proxy_joined", default=False)

#: The audit log's default file name, in the data dir.
AUDIT_FILE = "audit.log"
BUFFER_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0
FORMATS = ("json", "combined")

#: Query parameters whose value is never written (matched as parts of the lowercased name).
_SECRET_NAMES = ("pass", "secret", "token", "key", "auth", "credential", "signature", "session")
_HIDDEN = "REDACTED"
#: A JSON string value that needs no escaping: printable ASCII without quote or backslash.
_NEEDS_ESCAPE = re.compile(r"[^ !#-\[\]-~]")
#: What nginx escapes as \xHH in its access log.
_NGINX_ESCAPE = re.compile(r'[^ !#-\[\]-~]|"|\\')
#: What :meth:`AuditLog.prepare` renders of a line ahead of its time: in JSON the fields from
#: ``user`` to ``bytes`` (and ""), in the combined format what comes before and after the time.
LineParts = tuple[str, str]
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _json_string(value: str) -> str:
    """``value`` as a JSON string literal (cheap when it needs no escaping, the usual case)."""
    if _NEEDS_ESCAPE.search(value) is None:
        return f'"{value}"'
    return json.dumps(value)


def _nginx_escape(value: str) -> str:
    if _NGINX_ESCAPE.search(value) is None:
        return value
    return _NGINX_ESCAPE.sub(
        lambda m: "".join(f"\\x{b:02X}" for b in m[0].encode("utf-8", "surrogatepass")), value
    )


_PUBLIC_QUERIES: dict[bytes | str, str] = {}  # the last answers of public_query (hits repeat)
_PUBLIC_QUERIES_KEPT = 1024


def public_query(query: bytes | str) -> str:
    """The query string for the audit line: values of parameters that may be secrets masked."""
    if not query:
        return ""
    known = _PUBLIC_QUERIES.get(query)
    if known is not None:
        return known
    text = query.decode("latin-1") if isinstance(query, bytes) else query
    public = _masked(text)
    if public is text:  # kept only when nothing was masked: no secret stays here
        if len(_PUBLIC_QUERIES) >= _PUBLIC_QUERIES_KEPT:
            _PUBLIC_QUERIES.clear()
        _PUBLIC_QUERIES[query] = public
    return public


def _masked(text: str) -> str:
    lowered = text.lower()
    if not any(name in lowered for name in _SECRET_NAMES):
        return text
    parts = []
    for part in text.split("&"):
        name, equals, _ = part.partition("=")
        if equals and any(secret in name.lower() for secret in _SECRET_NAMES):
            part = f"{name}={_HIDDEN}"
        elif not equals and any(secret in name.lower() for secret in _SECRET_NAMES):
            part = _HIDDEN  # a bare word that looks like a secret (``?token=`` mistyped)
        parts.append(part)
    return "&".join(parts)


class AuditLog:
    """Where the audit lines go: a file (``target``), ``-`` for stderr, or ``None`` for off.

    Used from the event loop's thread only (the request path and the protocol both run there).
    """

    def __init__(
        self,
        target: Path | str | None,
        form: str = "json",
        *,
        buffer_bytes: int = BUFFER_BYTES,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        if form not in FORMATS:
            raise ValueError(f"unknown audit format {form!r}")
        self.target = None if target is None else str(target)
        self.on = target is not None
        self.combined = form == "combined"
        self._buffer_bytes = buffer_bytes
        self._flush_seconds = flush_seconds
        self._lines: list[str] = []
        self._size = 0
        self._fd: int | None = None
        self._timer: TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._milli = -1
        self._time = ""  # the JSON line's start for the millisecond _milli
        self.failures = 0  # writes that failed (their lines are lost)

    def describe(self) -> str:
        """Where the lines go, for the start-up line."""
        if self.target is None:
            return "off"
        place = "stderr" if self.target == "-" else self.target
        return f"{place} ({'combined' if self.combined else 'json'})"

    # Rendering

    def record(
        self,
        *,
        user: str,
        client: str,
        method: str,
        path: str,
        query: str,
        status: int,
        cache: str,
        size: int,
        started: float,
        outcome: str = "ok",
    ) -> None:
        """Add the line of one request (``started``: ``perf_counter()`` at its first byte)."""
        parts = self.prepare(
            user=user,
            client=client,
            method=method,
            path=path,
            query=query,
            status=status,
            cache=cache,
            size=size,
        )
        self.record_prepared(parts, started, outcome)

    def prepare(
        self,
        *,
        user: str,
        client: str,
        method: str,
        path: str,
        query: str,
        status: int,
        cache: str,
        size: int,
    ) -> LineParts:
        """The parts of a line that do not change with the time: a repeated hit renders them
        once (per connection, in the protocol shortcut) and only the time and duration after."""
        if self.combined:
            request = f"{method} {path}?{query} HTTP/1.1" if query else f"{method} {path} HTTP/1.1"
            remote_user = user if user not in ("", "anonymous") else "-"
            return (
                f"{client} - {_nginx_escape(remote_user)} [",
                f'] "{_nginx_escape(request)}" {status} {size} "-" "-"\n',
            )
        if _NEEDS_ESCAPE.search(f"{user}{client}{method}{path}{query}{cache}") is None:  # the usual
            return (
                f'"user":"{user}","client":"{client}","method":"{method}","path":"{path}",'
                f'"query":"{query}","status":{status},"cache":"{cache}","bytes":{size},',
                "",
            )
        return (
            f'"user":{_json_string(user)},"client":{_json_string(client)},'
            f'"method":{_json_string(method)},"path":{_json_string(path)},'
            f'"query":{_json_string(query)},"status":{status},"cache":{_json_string(cache)},'
            f'"bytes":{size},',
            "",
        )

    def record_prepared(self, parts: LineParts, started: float, outcome: str = "ok") -> None:
        """Add the line of one request from the parts :meth:`prepare` rendered."""
        ms = (time.perf_counter() - started) * 1000
        milli = int(time.time() * 1000)
        if milli != self._milli:  # lines within the same millisecond share their time
            self._milli = milli
            second = milli // 1000
            if second != self._second:
                self._second = second
                self._stamp = (
                    self._combined_time(second)
                    if self.combined
                    else time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                )
            self._time = f'{{"time":"{self._stamp}.{milli % 1000:03d}Z",'
        # The line goes into the buffer in three pieces, joined when the buffer is written.
        if self.combined:
            self._add(parts[0], self._stamp, parts[1])
        else:
            self._add(self._time, parts[0], f'"ms":{ms:.3f},"outcome":"{outcome}"}}\n')

    @staticmethod
    def _combined_time(second: int) -> str:
        t = time.gmtime(second)
        return (
            f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
        )

    # Buffering and writing

    def write(self, line: str) -> None:
        """Buffer one rendered line (ending in a newline); write the buffer when it is due."""
        self._add(line, "", "")

    def _add(self, first: str, second: str, third: str) -> None:
        """Buffer one line given in three pieces."""
        if not self.on:
            return
        lines = self._lines
        lines.append(first)
        lines.append(second)
        lines.append(third)
        self._size += len(first) + len(second) + len(third)
        if self._size >= self._buffer_bytes:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()  # no loop to flush it later (a synchronous caller)
                return
            self._timer = loop.call_later(self._flush_seconds, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def open(self) -> None:
        """Open the file now (at start-up), so that a wrong path fails the start."""
        if self.on and self._fd is None:
            self._fd = self._open()

    def _open(self) -> int:
        assert self.target is not None
        if self.target == "-":
            return 2
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        return os.open(self.target, flags, 0o600)  # it names users: private when created

    def flush(self) -> None:
        """Write what is buffered, in one write of whole lines."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines.clear()
        self._size = 0
        try:
            if self._fd is None:
                self._fd = self._open()
            view = memoryview(data)
            while view:  # a regular file takes it all at once; a pipe (stderr) may not
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.error("cannot write the audit log %s: %s (lines lost)", self.target, exc)

    def reopen(self) -> None:
        """Flush, then write to a fresh file at the same path (after logrotate moved it)."""
        self.flush()
        self._close_fd()
        if self.on:
            log.info("audit log reopened: %s", self.describe())

    def close(self) -> None:
        """Flush and close (at shutdown; a line written later opens the file again)."""
        self.flush()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd != 2:
            os.close(fd)


#: The audit log of a gateway built without one (off).
OFF = AuditLog(None)
#: The messages that carry a response's body.
_BODY = ("http.response.body", ZERO_COPY)


class Progress:
    """What has been sent of one answer so far: for its audit line, and so that an error
    after the answer has started is not answered a second time."""

    __slots__ = ("broken", "cache", "complete", "size", "started", "status")

    def __init__(self) -> None:
        self.started = False
        self.complete = False  # the last body message went out
        self.broken = False  # an exception ended the exchange
        self.status = 0
        self.cache = "-"
        self.size = 0

    def watch(self, send: Send) -> Send:
        """``send``, noting in this progress what passes through it."""

        async def tracked(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.started = True
                self.status = message["status"]
                for name, value in message["headers"]:
                    if name == b"x-cache":
                        self.cache = value.decode("latin-1")
                if self.cache == "MISS" and JOINED.get():
                    self.cache = "JOINED"
            elif kind != ZERO_COPY:
                self.size += len(message.get("body", b""))
            try:
                await send(message)
            except BaseException:
                if kind == ZERO_COPY:
                    self.size += message.get(SENT, 0)
                raise
            if kind == ZERO_COPY:
                # What went, not what was asked: a client that leaves ends a large send early
                # (the sender counts in the message; one that does not sent all or nothing).
                self.size += message.get(SENT, message["count"])
            if kind in _BODY and not message.get("more_body", False):
                self.complete = True

        return tracked

    def outcome(self, aborted_by_server: bool) -> str:
        """``ok``, ``aborted`` (by the gateway or the server) or ``abandoned`` (by the client)."""
        if self.complete:
            return "ok"
        if self.broken or aborted_by_server:
            return "aborted"
        return "abandoned"

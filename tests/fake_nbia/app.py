"""FakeNBIA: the raw ASGI app holding all state (data, tokens, faults, request log)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from . import routes_images, routes_legacy, routes_v4  # noqa: F401  (register routes)
from .dataset import Series, Study, build_dataset
from .faults import CutMode, Faults, SlowRule, ZipFaultKind
from .images import DEFAULT_BIG_ZIP_BYTES, ImageStore, StreamedZip, bulk_instances_for
from .responses import (
    SERVER_ERROR,
    ApiError,
    HugeJson,
    Reply,
    empty,
    server_error,
    text,
    unauthorized,
)
from .routing import ROUTES, Call, LoggedRequest, check_allowed, resolve
from .tables import Tables
from .tokens import GUEST, TokenStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK = 1024 * 1024
#: Tomcat's maxHttpHeaderSize: a request line plus headers beyond it is a 400 before any resource.
MAX_HEAD_BYTES = 8192
FORM_TYPE = "application/x-www-form-urlencoded"
SLOW_CHUNK = 4 * 1024  # with seconds_between_chunks, even small zips come in pieces
TOMCAT_PAGE = (
    '<!doctype html><html lang="en"><head><title>HTTP Status {0} – {1}</title>'
    "</head><body><h1>HTTP Status {0} – {1}</h1></body></html>"
)


@dataclass
class SharedList:
    user: str
    series: list[str]
    description: str | None
    url: str | None


class FakeNBIA:
    """A fake NBIA server (one host: 'nbia' or 'nlst'); an ASGI application."""

    def __init__(
        self,
        name: str = "nbia",
        big_zip_bytes: int = DEFAULT_BIG_ZIP_BYTES,
        bulk_series: int = 0,
        bulk_series_bytes: int = 0,
    ) -> None:
        self.name = name
        self.dataset = build_dataset(name, bulk_series, bulk_instances_for(bulk_series_bytes))
        self._original: tuple[list[Series], list[Study]] | None = None
        self._holds: list[tuple[str, threading.Event]] = []
        self._body_holds: list[tuple[str, int, threading.Event]] = []
        self.images = ImageStore(self.dataset)
        self.images.set_big_zip_bytes(big_zip_bytes)
        self.tables = Tables(self.dataset, self.images)
        self.tokens = TokenStore()
        self.faults = Faults()
        self._lock = threading.Lock()
        self.requests: list[LoggedRequest] = []
        self.shared_lists: dict[str, SharedList] = {}
        self.require_token_on_v4 = False
        self._rate: tuple[float, float] = (0.0, 1.0)
        self._recent: list[float] = []
        self.rate_limited = 0
        self._body_cuts: list[list[Any]] = []
        self._huge: list[HugeJson] = []

    # --- state ----------------------------------------------------------------

    def reset(self) -> None:
        """Clear the log, faults, tokens, counters and created lists; restore defaults.

        The big zip keeps its size (it is data, and expensive to rebuild).
        """
        with self._lock:
            self.requests.clear()
            self.shared_lists.clear()
        self.tokens.reset()
        self.faults.reset()
        self.require_token_on_v4 = False
        self.rate_limit(0)
        self.rate_limited = 0  # 429s sent by rate_limit()
        self._body_cuts: list[list[Any]] = []
        self._huge = []
        self.restore_dataset()
        with self._lock:
            for gate in [gate for _, gate in self._holds] + [g for *_, g in self._body_holds]:
                gate.set()  # nothing stays held for the next test
            self._holds = []
            self._body_holds = []

    # --- update feeds ---------------------------------------------------------------

    def mark_updated(
        self,
        series_uid: str,
        released: dt.date | None = None,
        study_description: str | None = None,
        **changes: Any,
    ) -> Series:
        """Change a series (``changes`` are Series fields, e.g. ``description``) and release
        it again on ``released`` (default: today, UTC), as TCIA's QC does: the update feeds
        (getUpdatedSeries, NewPatientsInCollection, NewStudiesInPatientCollection) then report
        it. ``study_description`` changes its study too. :meth:`reset` undoes it."""
        with self._lock:
            if self._original is None:
                self._original = (list(self.dataset.series), list(self.dataset.studies))
            day = released or dt.datetime.now(dt.UTC).date()
            for i, old in enumerate(self.dataset.series):
                if old.uid == series_uid:
                    new = dataclasses.replace(old, released=day, **changes)
                    self.dataset.series[i] = new
                    break
            else:
                raise KeyError(series_uid)
            if study_description is not None:
                for i, study in enumerate(self.dataset.studies):
                    if study.uid == new.study_uid:
                        self.dataset.studies[i] = dataclasses.replace(
                            study, description=study_description
                        )
            return new

    def hold(self, path_contains: str) -> threading.Event:
        """Hold every matching request (after logging it) until the returned event is set."""
        gate = threading.Event()
        with self._lock:
            self._holds.append((path_contains, gate))
        return gate

    def hold_body(self, path_contains: str, after_bytes: int) -> threading.Event:
        """Stop every streamed answer whose path or query contains ``path_contains`` once
        ``after_bytes`` of its body are sent, until
        the returned event is set (a download that is surely still running, without a clock)."""
        gate = threading.Event()
        with self._lock:
            self._body_holds.append((path_contains, after_bytes, gate))
        return gate

    def restore_dataset(self) -> None:
        """Undo :meth:`mark_updated` (the dataset as built)."""
        with self._lock:
            if self._original is not None:
                self.dataset.series[:], self.dataset.studies[:] = self._original
                self._original = None

    def requests_to(self, path_suffix: str) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    @property
    def big_series_uid(self) -> str:
        return self.dataset.big_series_uid

    def set_big_zip_bytes(self, n: int) -> None:
        self.images.set_big_zip_bytes(n)

    def shared_cart(self, name: str) -> list[str]:
        if name in self.dataset.shared_carts:
            return self.dataset.shared_carts[name]
        made = self.shared_lists.get(name)
        return made.series if made else []

    def add_shared_list(
        self, name: str, series: list[str], user: str, description: str | None, url: str | None
    ) -> bool:
        with self._lock:
            if name in self.shared_lists or name in self.dataset.shared_carts:
                return False
            self.shared_lists[name] = SharedList(user, series, description, url)
            return True

    # token side: thin properties over TokenStore so tests can assign them

    @property
    def token_lifetime_seconds(self) -> float:
        return self.tokens.token_lifetime_seconds

    @token_lifetime_seconds.setter
    def token_lifetime_seconds(self, value: float) -> None:
        self.tokens.token_lifetime_seconds = value

    @property
    def refresh_lifetime_seconds(self) -> float:
        return self.tokens.refresh_lifetime_seconds

    @refresh_lifetime_seconds.setter
    def refresh_lifetime_seconds(self, value: float) -> None:
        self.tokens.refresh_lifetime_seconds = value

    @property
    def users(self) -> dict[str, str]:
        return self.tokens.users

    @users.setter
    def users(self, value: dict[str, str]) -> None:
        self.tokens.users = value

    @property
    def clock(self) -> Callable[[], float]:
        return self.tokens.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self.tokens.clock = value

    @property
    def password_grants(self) -> int:
        return self.tokens.password_grants

    @property
    def refresh_grants(self) -> int:
        return self.tokens.refresh_grants

    @property
    def issued_access_tokens(self) -> set[str]:
        """Every access token issued since the last reset (valid or not)."""
        return set(self.tokens.issued)

    def revoke_tokens(self) -> None:
        self.tokens.revoke_all()

    def expire_access_tokens(self) -> None:
        self.tokens.expire_access()

    # faults

    def fail_next(
        self,
        n: int,
        status: int = 500,
        retry_after: float | str | None = None,
        path_contains: str | None = None,
        include_token: bool = False,
    ) -> None:
        """The next `n` matching requests get `status` instead of an answer."""
        self.faults.fail_next(n, status, retry_after, path_contains, include_token)

    def slow(
        self,
        seconds_before_headers: float = 0.0,
        seconds_between_chunks: float = 0.0,
        path_contains: str | None = None,
        include_token: bool = False,
    ) -> None:
        """Delay every matching response (all zeros switches it off)."""
        self.faults.set_slow(
            seconds_before_headers, seconds_between_chunks, path_contains, include_token
        )

    def cut_stream(
        self,
        after_bytes: int,
        mode: CutMode = "abort",
        times: int | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Zip downloads stop after `after_bytes` (`times` downloads, or until reset)."""
        if mode not in ("abort", "clean"):
            raise ValueError(f"mode must be 'abort' or 'clean', not {mode!r}")
        self.faults.cut(after_bytes, mode, times, path_contains)

    def close_zip_after(
        self, images: int, times: int | None = None, path_contains: str | None = None
    ) -> None:
        """Series zips end after ``images`` images, well-formed, HTTP 200, no md5hashes.csv:
        NBIA's writer caught an error mid-loop and closed the zip (``times`` downloads, or
        until reset)."""
        self._zip_fault("closed_after", images, times, path_contains)

    def alter_image(
        self, number: int = 1, times: int | None = None, path_contains: str | None = None
    ) -> None:
        """Image ``number`` (1-based) of series zips has other bytes than the MD5 that
        md5hashes.csv and getMD5HashForImage list; the zip's CRC-32s match the bytes sent.
        A WADO answer (v1 wado, getWado) of image ``number`` is changed the same way (its
        last byte: a JPEG loses its end-of-image marker)."""
        self._zip_fault("altered_image", number, times, path_contains)

    def _zip_fault(
        self, kind: ZipFaultKind, images: int, times: int | None, path_contains: str | None
    ) -> None:
        if images < (0 if kind == "closed_after" else 1):
            raise ValueError(f"{kind}: image number {images} out of range")
        self.faults.zip_fault(kind, images, times, path_contains)

    def drop_connection_next(
        self, n: int, path_contains: str | None = None, include_token: bool = False
    ) -> None:
        """The next `n` matching requests are read, then the socket closes with no answer."""
        self.faults.drop_next(n, path_contains, include_token)

    def cut_body_next(self, n: int, after_bytes: int, path_contains: str | None = None) -> None:
        """The next ``n`` matching non-streamed answers (JSON, CSV, text) declare their full
        Content-Length, send ``after_bytes`` of the body, then the connection is reset."""
        with self._lock:
            self._body_cuts.append([n, after_bytes, path_contains])

    def _take_body_cut(self, path: str) -> int | None:
        with self._lock:
            for rule in self._body_cuts:
                remaining, after_bytes, contains = rule
                if remaining > 0 and (contains is None or contains in path):
                    rule[0] = remaining - 1
                    return int(after_bytes)
        return None

    def serve_huge_json(
        self, n_bytes: int, path_contains: str, *, declare_length: bool = False
    ) -> HugeJson:
        """Matching requests (until reset) get a 200 JSON array of exactly ``n_bytes``, made
        while it is sent (the fake never holds it): chunked, or with its Content-Length."""
        huge = HugeJson(n_bytes, path_contains, declare_length)
        with self._lock:
            self._huge.append(huge)
        return huge

    def _huge_for(self, path: str) -> HugeJson | None:
        with self._lock:
            return next((h for h in self._huge if h.path_contains in path), None)

    def rate_limit(self, per_second: float, retry_after: float = 1.0) -> None:
        """Answer 429 with Retry-After to requests beyond ``per_second`` in any one second,
        as a rate-limited public API does (the token endpoint is exempt). 0 switches it off."""
        with self._lock:
            self._rate = (per_second, retry_after)
            self._recent = []

    def _over_rate(self, path: str) -> float | None:
        """The Retry-After to answer with when this request exceeds the rate, else None."""
        per_second, retry_after = self._rate
        if per_second <= 0 or path.endswith("/oauth/token"):
            return None
        now = time.monotonic()
        with self._lock:
            self._recent = [t for t in self._recent if now - t < 1.0]
            if len(self._recent) >= per_second:
                self.rate_limited += 1
                return retry_after
            self._recent.append(now)
        return None

    # --- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        log = LoggedRequest(
            scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers, body
        )
        with self._lock:
            self.requests.append(log)
            gates = [gate for part, gate in self._holds if part in log.path]
        for gate in gates:
            await asyncio.to_thread(gate.wait, 60)  # a test's hold, never for ever

        if self.faults.take_drop(log.path):
            await _abort(send)
            return
        slow = self.faults.slowness(log.path)
        failure = self.faults.take_failure(log.path)
        limited = self._over_rate(log.path)
        # Decided on arrival, like failures: a slow request from an earlier test that only
        # now reaches the sending stage must not take a fault meant for a later one.
        cut_at = self._take_body_cut(log.path)
        huge = self._huge_for(log.path)
        if _head_bytes(scope) > MAX_HEAD_BYTES:
            reply = Reply(400, TOMCAT_PAGE.format(400, "Bad Request").encode(), "text/html")
        elif failure is not None:
            reply = _fault_reply(failure.status, failure.retry_after)
        elif limited is not None:
            reply = _fault_reply(429, limited)
        elif huge is not None:
            reply = huge.reply()
        else:
            reply = await asyncio.to_thread(self.handle, log)
        try:
            if slow is not None and slow.before_headers > 0:
                await asyncio.sleep(slow.before_headers)
            await self._send(reply, log, send, slow, cut_at)
        except asyncio.CancelledError:
            # stop() while a response is in flight: the connection just dies, like a
            # server going down, without uvicorn logging a traceback
            await _abort(send)

    def handle(self, log: LoggedRequest) -> Reply:
        """Route, authenticate, check parameters and run the handler (in a worker thread)."""
        target = resolve(log.path)
        route = ROUTES.get(target) if target else None
        if target is None or route is None:
            return Reply(404, TOMCAT_PAGE.format(404, "Not Found").encode(), "text/html")
        method = "GET" if log.method == "HEAD" else log.method
        if log.method == "OPTIONS":
            return Reply(
                200,
                headers=[
                    (
                        "allow",
                        f"{route.method},OPTIONS" + (",HEAD" if route.method == "GET" else ""),
                    )
                ],
            )
        if method != route.method:
            page = TOMCAT_PAGE.format(405, "Method Not Allowed").encode()
            return Reply(405, page, "text/html", [("allow", route.method)])
        form: list[tuple[str, str]] = []
        if method == "POST" and _is_form(log.headers.get("content-type")):
            form = parse_qsl(log.body.decode("utf-8", "replace"), keep_blank_values=True)
        call = Call(
            self, log, target[0], target[1], parse_qsl(log.query, keep_blank_values=True), form
        )
        try:
            call.user = log.user = self._identify(call)
            if route.allowed is not None:
                check_allowed(call, route.allowed)
            return route.handler(call)
        except ApiError as err:
            return err.reply
        except Exception as err:  # the UncaughtException mapper
            return server_error(f"{type(err).__name__}: {err}").reply

    def _identify(self, call: Call) -> str | None:
        """Who the caller is, exactly as each generation reads the Authorization header."""
        gen = call.generation
        if gen in ("v1", "auth"):
            return None  # v1 never reads the header
        header = call.bearer()
        if header is None:
            if gen == "root":
                raise server_error("null")  # getUserName() NPE
            if gen == "v2" or self.require_token_on_v4:
                raise unauthorized()
            return GUEST
        if header == "Bearer undefined":
            if gen == "v4" and self.require_token_on_v4:
                raise unauthorized()
            return GUEST
        if len(header) < 7:
            raise server_error(f"begin 0, end 7, length {len(header)}")  # substring(7)
        user = self.tokens.user_for_access(header[7:])
        if user is None:
            raise unauthorized()
        return user

    async def _send(
        self,
        reply: Reply,
        log: LoggedRequest,
        send: Send,
        slow: SlowRule | None,
        cut_at: int | None = None,
    ) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        if reply.content_type:
            headers.append((b"content-type", reply.content_type.encode()))
        streamed = reply.stream or not isinstance(reply.body, bytes)
        if not streamed:
            assert isinstance(reply.body, bytes)
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if log.method == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        if not streamed:
            if cut_at is not None:
                # The declared length promises more than arrives: a reset mid-body.
                await send(
                    {"type": "http.response.body", "body": reply.body[:cut_at], "more_body": True}
                )
                await _abort(send)
                return
            await send({"type": "http.response.body", "body": reply.body})
            return
        cut = self.faults.take_cut(log.path) if reply.zip else None
        limit = cut.after_bytes if cut else None
        gap = slow.between_chunks if slow else 0.0
        with self._lock:
            target = f"{log.path}?{log.query}"
            holds = [(at, gate) for part, at, gate in self._body_holds if part in target]
        sent = 0
        for chunk in _chunks(reply.body, SLOW_CHUNK if gap > 0 else CHUNK):
            if limit is not None and sent + len(chunk) >= limit:
                chunk = chunk[: limit - sent]
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if cut is not None and cut.mode == "abort":
                    await _abort(send)  # no terminating chunk: the client sees a broken body
                    return
                break  # "clean": a truncated zip with a proper end, as NBIA's writer does
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sent += len(chunk)
            for at, gate in [hold for hold in holds if sent >= hold[0]]:
                holds.remove((at, gate))
                await asyncio.to_thread(gate.wait, 60)  # a test's hold, never for ever
            if gap > 0:
                await asyncio.sleep(gap)
        await send({"type": "http.response.body", "body": b""})


def _is_form(content_type: str | None) -> bool:
    """Jersey's test: the media type is exactly the form type, parameters allowed."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == FORM_TYPE


def _head_bytes(scope: Scope) -> int:
    """The request line plus headers as they arrived (what Tomcat's header buffer holds)."""
    target = len(scope.get("raw_path") or scope["path"].encode())
    if scope["query_string"]:
        target += 1 + len(scope["query_string"])
    line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(n) + len(v) + 4 for n, v in scope["headers"]) + 2


def _chunks(body: bytes | Path | HugeJson | StreamedZip, size: int) -> Any:
    """Yield `body` in pieces of `size` (a Path is read lazily, a HugeJson made on the way)."""
    if isinstance(body, HugeJson | StreamedZip):
        yield from body.pieces(size)
        return
    if isinstance(body, bytes):
        for i in range(0, len(body), size):
            yield body[i : i + size]
        return
    with open(body, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def _fault_reply(status: int, retry_after: float | str | None) -> Reply:
    if status == 500:
        reply = text(f"{SERVER_ERROR}\njava.lang.RuntimeException: injected fault", 500)
    elif status in (401, 204, 304):
        reply = empty(status)
    else:
        phrases = {
            429: "Too Many Requests",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
            400: "Bad Request",
            403: "Forbidden",
            404: "Not Found",
        }
        reply = text(phrases.get(status, "Error"), status)
    if retry_after is not None:
        value = str(int(retry_after)) if isinstance(retry_after, (int, float)) else retry_after
        reply.headers.append(("retry-after", value))
    return reply


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


class _DeliberateAbort(Exception):
    """Raised when the transport is not reachable; uvicorn then closes the connection."""


async def _abort(send: Send) -> None:
    """Close the client's TCP connection at once, whatever was or was not sent.

    uvicorn's `send` is a bound method of its request cycle, which holds the
    transport; abort() drops it without a clean HTTP ending.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        raise _DeliberateAbort()
    transport.abort()
    for _ in range(100):  # let connection_lost run so uvicorn won't answer a 500
        if getattr(cycle, "disconnected", True):
            break
        await asyncio.sleep(0)

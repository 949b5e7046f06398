"""Answering a binary download through the series cache: a kept file, a fill, or a relay.

:class:`SeriesCache` looks up what is stored for the request's key (a kept file, a fill in
progress in this process, nothing), asks :func:`proxy.binary.decision.decide`, and then serves
the kept file (``Range``/``If-Range``/``HEAD`` as :func:`proxy.binary.ranges.plan` says, from a
worker thread in large reads), reads the fill (:mod:`proxy.binary.fill`) as it grows, relays
the request without keeping it, or refuses it (offline, circuit open).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from starlette.types import Message, Receive, Send

from proxy.binary.decision import Action, Stored, decide
from proxy.binary.disk import read_at
from proxy.binary.files import BinaryStore, Kept, Reading
from proxy.binary.fill import FillFailed, Filling, FillJob, Fills, Head, Held, SizeSource
from proxy.binary.imagecheck import DicomCheck, JpegCheck
from proxy.binary.ranges import parse, plan
from proxy.binary.verdict import Check
from proxy.binary.zipcheck import Md5Policy, ZipCheck
from proxy.cache.policy import CacheKey, pairs
from proxy.cache.policy import wants_fresh as wants_fresh_answer
from proxy.cache.serving import CachedAnswers, cache_key
from proxy.cache.shape import Fit
from proxy.endpoints import Endpoint, Payload, lookup
from proxy.errors import StreamBroken, UpstreamError
from proxy.forwarding import Forwarding, OutgoingRequest, offline_miss
from proxy.headers import RawHeaders, find
from proxy.responses import AGE_ZERO, ZERO_COPY, send_bytes
from proxy.upstream import Upstream

log = logging.getLogger("nbia_proxy.binary")

HIT = (b"x-cache", b"HIT")
MISS = (b"x-cache", b"MISS")
#: Bytes read from a kept file per thread hop (and per ASGI body message).
HIT_READ_BYTES = 2 * 1024 * 1024
#: Bytes of a kept file per zero-copy send message: its figures (``bytes_from_disk``, the
#: audit line, the status page) grow by this much at a time.
HIT_SEND_BYTES = 32 * 1024 * 1024
#: Endpoints catalogued as DICOM whose answer is not one DICOM file: relayed, never kept.
_NOT_A_DICOM_FILE = frozenset({"v1/getAllSOPClassDefinition"})
#: Zips that always carry md5hashes.csv (series-cache-anchors.md §B1).
_ALWAYS_MD5 = frozenset({"getImageWithMD5Hash"})
#: Parameters that, set to ``yes``, make NBIA write md5hashes.csv: getImage's IncludeMD5,
#: getDCMImage's MD5Verification (catalog §2.1).
_ASKS_MD5 = frozenset({"includemd5", "md5verification"})
#: WADO-URI resources (catalog §2.2): the answer is a DICOM file or a JPEG, as ``contentType``
#: asks, so the check is chosen by that parameter.
_WADO = frozenset({"v1/wado", "v1/getWado", "getWado"})
_WADO_CHECKS: dict[str, Callable[[], Check]] = {
    "application/dicom": DicomCheck,
    "image/jpeg": JpegCheck,
}

Relay = Callable[[], Awaitable[None]]


class SeriesCache:
    """Kept binaries and the fills that make them, in front of the upstream."""

    def __init__(
        self,
        store: BinaryStore,
        forwarding: Forwarding,
        cached: CachedAnswers | None,
        *,
        token_on_v4: bool,
        background: bool,
        max_error_bytes: int,
        max_background_fills: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.forwarding = forwarding
        self.cached = cached
        self.token_on_v4 = token_on_v4
        self.fills = Fills(
            store,
            forwarding,
            background=background,
            max_error_bytes=max_error_bytes,
            max_alone=max_background_fills,
        )
        self.clock = clock
        self.hits = 0
        self.hit_bytes = 0

    def stats(self) -> dict[str, object]:
        """This process's figures (the store's totals are :meth:`BinaryStore.stats`)."""
        counters = self.fills.counters
        return {
            "hits": self.hits,
            "bytes_from_disk": self.hit_bytes,
            "fills_in_progress": self.fills.in_progress,
            "fills_started": counters.started,
            "fills_joined": counters.joined,
            "fills_kept": counters.kept,
            "fills_in_background": counters.background,
            "fills_alone": self.fills.alone,
            "fills_stopped_alone": counters.stopped_alone,
            "fills_retried": counters.retried,
            "validation_failures": dict(counters.failures),
        }

    async def serve(
        self,
        upstream: Upstream,
        endpoint: Endpoint,
        request: OutgoingRequest,
        fit: Fit,
        receive: Receive,
        send: Send,
        relay: Relay,
        held: Held | None = None,
        *,
        zero_copy: bool = False,
    ) -> None:
        """Answer a binary download (``fit`` as classified for its GET/POST form); ``held`` is
        the client's download slot, which a fill it leaves going on alone takes over;
        ``zero_copy``: the server offers the ASGI zero-copy send, for a kept file's bytes."""
        key = cache_key(upstream, endpoint, _as_read(request), self.token_on_v4)
        headers = request.headers
        wants_fresh = wants_fresh_answer(find(headers, b"cache-control"), find(headers, b"pragma"))
        filling = self.fills.current(key.digest)
        kept, opened = None, None
        if filling is None or not wants_fresh:
            # A kept file asked for without no-cache is served whatever else holds: it is
            # opened in the same thread hop as its lookup (one hop per hit, not two).
            kept, opened = await asyncio.to_thread(self._find, key.digest, not wants_fresh)
            # A fill may have started, or ended and kept its file, during the lookup.
            filling = self.fills.current(key.digest)
            if kept is None and filling is None:
                kept = self.fills.recently_kept(key.digest)
        try:
            if filling is not None and filling.checked:
                # Checked and being committed (the fsync): in a moment it is a kept file, with
                # its size and ETag for Range, If-Range and HEAD.
                with contextlib.suppress(FillFailed):
                    await filling.wait_done()
                kept = filling.kept or kept  # not kept (the disk refused it): fetched afresh
                filling = None
            stored = Stored.KEPT if kept is not None else Stored.NOTHING
            if filling is not None and (kept is None or wants_fresh):
                stored = Stored.FILLING
            params = pairs(request.query if request.method != "POST" else request.body)
            check = _check_for(endpoint, params)
            action = decide(
                stored,
                method=request.method,
                wants_fresh=wants_fresh,
                offline=self.forwarding.offline,
                circuit_open=upstream.breaker.refusing,
                shared=fit is Fit.EXACT and check is not None,
                ranged=request.method == "GET" and find(headers, b"range") is not None,
            )
            if action is Action.SERVE:
                assert kept is not None
                reading = opened if opened is not None and opened.kept is kept else None
                if await self._serve_kept(kept, request, receive, send, reading, zero_copy):
                    return
                action = Action.REFUSE_OFFLINE if self.forwarding.offline else Action.RELAY
            if action is Action.REFUSE_OFFLINE:
                raise offline_miss(upstream.name)
            if action is Action.REFUSE_CIRCUIT:
                upstream.breaker.before()  # raises CircuitOpen (the usual 503) while it refuses
                action = Action.RELAY
            if action is Action.RELAY:
                await relay()
                return
            if action is Action.FILL:
                assert check is not None
                token = ""
                if self.fills.across is not None:
                    token_or_none = await self.fills.across.claim(key.digest, self._settled(key))
                    if token_or_none is None:  # filled by another process meanwhile: anew
                        await self.serve(
                            upstream,
                            endpoint,
                            request,
                            fit,
                            receive,
                            send,
                            relay,
                            held,
                            zero_copy=zero_copy,
                        )
                        return
                    token = token_or_none
                sizes = self._sizes(upstream, endpoint, request, params)
                job = FillJob(upstream, endpoint, request, key, _factory(check), sizes)
                filling = self.fills.start(job)
                if self.fills.across is not None and filling.task is not None:
                    self.fills.across.hold(key.digest, token, filling.task)
            else:
                self.fills.counters.joined += 1
            assert filling is not None
            await self._read_fill(filling, request, receive, send, held)
        finally:
            if opened is not None:
                opened.close()  # unused, or served (closing twice is nothing)

    def _find(self, digest: str, open_it: bool) -> tuple[Kept | None, Reading | None]:
        """The kept file of ``digest`` and, with ``open_it``, that file opened for serving
        (blocking: run it in a thread)."""
        kept = self.store.lookup(digest)
        if kept is None or not open_it:
            return kept, None
        reading = self.store.open_read(kept)
        return (None, None) if reading is None else (kept, reading)

    def _settled(self, key: CacheKey) -> Callable[[], Awaitable[bool]]:
        """Whether ``key`` has a kept file now, or a fill of this process to join."""

        async def settled() -> bool:
            if self.fills.current(key.digest) is not None:
                return True
            return await asyncio.to_thread(self.store.lookup, key.digest) is not None

        return settled

    # kept files ----------------------------------------------------------------------------

    async def _serve_kept(
        self,
        kept: Kept,
        request: OutgoingRequest,
        receive: Receive,
        send: Send,
        reading: Reading | None = None,
        zero_copy: bool = False,
    ) -> bool:
        """Send a kept file (``reading``: already open; ``zero_copy``: with the server's
        zero-copy send); False when it is gone after all (nothing sent then)."""
        if reading is None:
            reading = await asyncio.to_thread(self.store.open_read, kept)
        if reading is None:
            return False
        try:
            method = request.method.encode()
            answer = plan(
                kept.size,
                kept.etag,
                method=b"HEAD" if method == b"HEAD" else b"GET",
                range_header=find(request.headers, b"range") if method == b"GET" else None,
                if_range=find(request.headers, b"if-range"),
            )
            age = max(0, int(self.clock() - kept.fetched_at))
            headers = [*answer.headers, *_kept_headers(kept), HIT, (b"age", b"%d" % age)]
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
            self.hits += 1
            if not answer.body:
                await send({"type": "http.response.body", "body": b""})
                return True
            fd = reading.file.fileno()

            async def send_file() -> None:
                offset, remaining = answer.start, answer.length
                while remaining:
                    count = min(HIT_SEND_BYTES, remaining)
                    remaining -= count
                    self.hit_bytes += count
                    message = {"type": ZERO_COPY, "file": fd, "offset": offset, "count": count}
                    try:
                        await send({**message, "more_body": bool(remaining)})
                    except EOFError as exc:
                        raise StreamBroken("the kept file ended early") from exc
                    except OSError:
                        return  # the client is gone: the answer stays unfinished
                    offset += count

            async def pump() -> None:
                offset, remaining = answer.start, answer.length
                while remaining:
                    data = await read_at(fd, min(HIT_READ_BYTES, remaining), offset)
                    if not data:
                        raise StreamBroken("the kept file ended early")
                    offset += len(data)
                    remaining -= len(data)
                    self.hit_bytes += len(data)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b""})

            await _until_gone(send_file() if zero_copy else pump(), receive)
            return True
        finally:
            reading.close()

    # fills ---------------------------------------------------------------------------------

    async def _read_fill(
        self,
        filling: Filling,
        request: OutgoingRequest,
        receive: Receive,
        send: Send,
        held: Held | None,
    ) -> None:
        """Answer from a fill: all of it as it arrives, or (Range, If-Range, HEAD) what it
        covers once it is there."""
        reader = filling.join()
        try:
            head = await filling.wait_head()
            if head.whole is not None:
                await send_bytes(send, head.status, head.whole, [*head.headers, MISS, AGE_ZERO])
                return
            range_header = find(request.headers, b"range") if request.method == "GET" else None
            if request.method == "HEAD" or range_header is not None:
                await self._partial(filling, reader, head, request, range_header, receive, send)
                return
            await self._stream(filling, reader, head, 0, None, 200, [], receive, send)
        finally:
            filling.leave(reader, held)

    async def _partial(
        self,
        filling: Filling,
        reader: int,
        head: Head,
        request: OutgoingRequest,
        range_header: bytes | None,
        receive: Receive,
        send: Send,
    ) -> None:
        """HEAD or Range on a fill: a closed range the fill already covers (or will, before it
        ends) is sent from it as ``bytes a-b/*``; anything else waits for the kept file."""
        wanted = None
        if range_header is not None and find(request.headers, b"if-range") is None:
            wanted = _closed_range(range_header)
        try:
            if wanted is not None and await filling.wait_for(wanted[0] + wanted[1]):
                start, length = wanted
                content_range = b"bytes %d-%d/*" % (start, start + length - 1)
                extra = [(b"content-range", content_range), (b"content-length", b"%d" % length)]
                await self._stream(filling, reader, head, start, length, 206, extra, receive, send)
                return
            await filling.wait_done()
        except FillFailed as failure:
            raise UpstreamError(f"the download failed: {failure.message}") from failure
        if filling.kept is None or not await self._serve_kept(filling.kept, request, receive, send):
            raise UpstreamError("the download was not kept; ask again for the whole file")

    async def _stream(
        self,
        filling: Filling,
        reader: int,
        head: Head,
        start: int,
        length: int | None,
        status: int,
        extra: RawHeaders,
        receive: Receive,
        send: Send,
    ) -> None:
        headers = [*head.headers, *extra, MISS, AGE_ZERO]
        if status == 200 and head.length is not None:
            headers.append((b"content-length", b"%d" % head.length))
        await send({"type": "http.response.start", "status": status, "headers": headers})

        async def pump() -> None:
            offset = start
            end = None if length is None else start + length
            while end is None or offset < end:
                limit = 1024 * 1024 if end is None else min(1024 * 1024, end - offset)
                try:
                    data = await filling.read(reader, offset, limit)
                except FillFailed as failure:
                    raise StreamBroken(failure.message) from failure
                if not data:
                    if end is not None:
                        raise StreamBroken("the download ended before the range")
                    break
                offset += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        await _until_gone(pump(), receive)

    # NBIA's numbers ------------------------------------------------------------------------

    def _sizes(
        self,
        upstream: Upstream,
        endpoint: Endpoint,
        request: OutgoingRequest,
        params: list[tuple[str, str]],
    ) -> SizeSource | None:
        """How to get (ObjectCount, TotalSizeInBytes) of a zip's series through the metadata
        cache, or None (not a zip, no series named, no metadata cache)."""
        cached = self.cached
        if cached is None or endpoint.payload is not Payload.BINARY_ZIP:
            return None
        uid = next((v for k, v in params if k.lower() == "seriesinstanceuid" and v), None)
        size_endpoint = lookup(_sibling(request.raw_path, "getSeriesSize"))
        if uid is None or size_endpoint is None:
            return None
        path = _sibling(request.raw_path, "getSeriesSize")

        async def sizes() -> tuple[int, int] | None:
            captured = _Captured()
            query = "SeriesInstanceUID=" + quote(uid, safe="")
            await self._ask(cached, upstream, size_endpoint, path, query, captured)
            return captured.numbers()

        return sizes

    async def collection_series(self, upstream: Upstream, collection: str) -> set[str] | None:
        """The series NBIA lists for ``collection`` (v4 getSeries, through the metadata cache,
        with the service token), or None when that cannot be had: no metadata cache, offline,
        the upstream failing, or an answer beyond :data:`SERIES_LIST_MAX_BYTES`."""
        cached = self.cached
        path = "/nbia-api/services/v4/getSeries"
        endpoint = lookup(path)
        if cached is None or endpoint is None or self.forwarding.offline:
            return None
        captured = _Captured(limit=SERIES_LIST_MAX_BYTES)
        query = "Collection=" + quote(collection, safe="")
        try:
            await self._ask(cached, upstream, endpoint, path, query, captured)
        except (UpstreamError, StreamBroken) as exc:
            log.info("purge: getSeries of %s from %s failed: %s", collection, upstream.name, exc)
            return None
        return captured.series()

    async def _ask(
        self,
        cached: CachedAnswers,
        upstream: Upstream,
        endpoint: Endpoint,
        path: str,
        query: str,
        sink: _Captured,
    ) -> None:
        """A GET of the gateway's own (a metadata answer it needs) through the metadata cache."""
        asking = OutgoingRequest(
            method="GET",
            raw_path=path.encode(),
            query=query.encode(),
            headers=[(b"accept", b"application/json")],
            body=b"",
        )
        key = cache_key(upstream, endpoint, asking, self.token_on_v4)
        await cached.serve(upstream, endpoint, asking, key, Fit.EXACT, _never, sink)


#: A getSeries answer read for a purge is held in memory whole: beyond this, the purge counts
#: the collection's files as unknown instead (NLST's one collection lists about 200,000 series).
SERIES_LIST_MAX_BYTES = 64 * 1024 * 1024


class _Captured:
    """An ASGI ``send`` that keeps the answer, up to ``limit`` bytes (beyond: none of it)."""

    def __init__(self, limit: int = 1024 * 1024) -> None:
        self.status = 0
        self.body = bytearray()
        self.limit = limit
        self.too_large = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not self.too_large:
            self.body += message.get("body", b"")
            if len(self.body) > self.limit:
                self.too_large = True
                self.body = bytearray()

    def series(self) -> set[str] | None:
        """The SeriesInstanceUIDs of a getSeries answer; None when it is not a whole one."""
        if self.status != 200 or self.too_large:
            return None
        if not self.body:
            return set()  # NBIA answers an unknown collection with an empty body
        try:
            rows = json.loads(bytes(self.body))
        except ValueError:
            return None
        if not isinstance(rows, list):
            return None
        found = (row.get("SeriesInstanceUID") for row in rows if isinstance(row, dict))
        return {uid for uid in found if isinstance(uid, str)}

    def numbers(self) -> tuple[int, int] | None:
        if self.status != 200 or not self.body:
            return None
        try:
            rows = json.loads(bytes(self.body))
            row = rows[0]
            count, size = int(row["ObjectCount"]), int(row["TotalSizeInBytes"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return (count, size) if count > 0 else None


def _as_read(request: OutgoingRequest) -> OutgoingRequest:
    """A HEAD asks about the GET's file: same key."""
    if request.method != "HEAD":
        return request
    return OutgoingRequest("GET", request.raw_path, request.query, request.headers, request.body)


def _sibling(raw_path: bytes, name: str) -> str:
    """The path of another resource of the same generation (``.../v4/getImage`` ->
    ``.../v4/getSeriesSize``)."""
    head, _, _ = raw_path.decode("latin-1").split("?")[0].rpartition("/")
    return f"{head}/{name}"


def _check_for(endpoint: Endpoint, params: list[tuple[str, str]]) -> Check | None:
    """A fresh check for the endpoint's payload (``params``: the request's parameters); None
    when it has none (then never kept)."""
    payload = endpoint.payload
    if payload is Payload.BINARY_ZIP:
        name = endpoint.path.rpartition("/")[2]
        asked = any(k.lower() in _ASKS_MD5 and v.lower() == "yes" for k, v in params)
        md5s: Md5Policy = "required" if name in _ALWAYS_MD5 or asked else "optional"
        if md5s == "optional" and name == "getImage":
            md5s = "ignore"  # NBIA writes md5hashes.csv only when asked: CRC-32s suffice
        return ZipCheck(md5s=md5s)
    if endpoint.path in _WADO:
        # Without one known type (absent: the server's default; a list: its pick) the kind of
        # answer is not known beforehand: relayed, never kept.
        content_type = next((v for k, v in params if k == "contentType"), "")
        make = _WADO_CHECKS.get(content_type.strip().lower())
        return None if make is None else make()
    if payload is Payload.BINARY_DICOM and endpoint.path not in _NOT_A_DICOM_FILE:
        return DicomCheck()
    if payload is Payload.BINARY_JPEG:
        return JpegCheck()
    return None


def _factory(first: Check) -> Callable[[], Check]:
    """The check for the fill (the one made for the decision, unused so far)."""
    return lambda: first


def _kept_headers(kept: Kept) -> RawHeaders:
    headers = [(b"content-type", kept.content_type.encode("latin-1"))]
    if kept.content_disposition:
        headers.append((b"content-disposition", kept.content_disposition.encode("latin-1")))
    return headers


def _closed_range(header: bytes) -> tuple[int, int] | None:
    """``(start, length)`` of a ``bytes=a-b`` range, the only kind a growing file can answer
    before its size is known; None for anything else."""
    _, _, spec = header.partition(b"=")
    first, dash, last = spec.strip().partition(b"-")
    if not (dash and first.isdigit() and last.isdigit()) or b"," in spec:
        return None
    parsed = parse(header, int(last) + 1)
    if not isinstance(parsed, tuple):
        return None
    return parsed


async def _until_gone(pump: Awaitable[None], receive: Receive) -> None:
    """Run ``pump`` until it ends or the client disconnects (then it is cancelled)."""
    pumping = asyncio.ensure_future(pump)
    watching = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        if pumping.done():
            pumping.result()
    finally:
        watching.cancel()
        pumping.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)


async def _never() -> Message:
    """The ``receive`` of a request no client waits on: it never hears a disconnect."""
    await asyncio.Future()
    raise AssertionError("unreachable")


async def _client_gone(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return

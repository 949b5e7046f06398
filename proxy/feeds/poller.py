"""The update-feed poller: asks each upstream what changed and purges it (the I/O around
:mod:`proxy.feeds.plan`).

Every ``update_poll_seconds`` (when due by the position the replicas share, see
:mod:`proxy.feeds.ledger`) one process per upstream asks ``v2/getUpdatedSeries`` with the
service token (``v4/getUpdatedSeries`` where v2 is not served), and, for each collection the
cache holds that ``v4/getCollectionValues`` lists, ``v4/NewPatientsInCollection`` and
``v4/NewStudiesInPatientCollection``. Its
requests go through the upstream's shield (breaker, queue, rate, retries) like a client's, one
at a time and each after the clients already queued for the upstream, so a poll takes one of
the upstream's slots at most. A failed poll backs off (30 s doubling, capped) and shows in the
stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from proxy.db import describe_failure
from proxy.endpoints import TokenUse
from proxy.errors import GatewayError
from proxy.feeds.ledger import Ledger, Position
from proxy.feeds.plan import (
    Form,
    backoff_seconds,
    feed_date,
    next_poll_at,
    purge_plan,
    window_start,
)
from proxy.forwarding import OutgoingRequest, open_shielded
from proxy.shield.retry import RetryPolicy
from proxy.streaming import read_bounded
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.binary.files import BinaryStore
    from proxy.cache.tiers import TieredCache

log = logging.getLogger("nbia_proxy.feeds")

_SERVICES = b"/nbia-api/services/"
#: A feed answer larger than this is refused (a failed poll): a day of TCIA's releases is far less.
FEED_MAX_BYTES = 256 * 1024 * 1024
#: Answers that say an upstream does not serve v2 (or not to this account): ask v4 instead.
_NO_V2 = frozenset({401, 403, 404, 405})
#: The wait before a starting gateway's first look at the feeds: it serves first, and replicas
#: started together find the position the first of them wrote.
FIRST_POLL_SECONDS = 60.0
#: How long a feed request waits for the clients queued for the upstream to go first.
YIELD_SECONDS = 60.0
#: The outcomes a poll is counted under (``nbia_proxy_feed_polls_total{outcome}``);
#: ``too_soon``: a forced poll refused, the upstream having been asked too recently.
OUTCOMES = ("ok", "failed", "busy", "not_due", "too_soon")


class FeedError(Exception):
    """A feed could not be read: the poll fails and backs off."""


@dataclass
class FeedState:
    """What this process knows of one upstream's feeds beyond the shared position."""

    polls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    last: dict[str, Any] = field(default_factory=dict)  # the last poll's result, as answered
    polling: bool = False


class FeedPoller:
    """Polls every upstream's update feeds and purges what they report."""

    def __init__(
        self,
        upstreams: list[Upstream],
        cache: TieredCache,
        binaries: BinaryStore | None,
        ledger: Ledger,
        *,
        interval: float,
        token_on_v4: bool,
        retry: RetryPolicy,
        forced_min_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstreams = {u.name: u for u in upstreams}
        self.cache = cache
        self.binaries = binaries
        self.ledger = ledger
        self.interval = interval
        self.token_on_v4 = token_on_v4
        self.retry = retry
        self.forced_min_seconds = forced_min_seconds
        self.clock = clock
        self.states = {name: FeedState() for name in self.upstreams}
        self._locks = {name: asyncio.Lock() for name in self.upstreams}

    async def run(self) -> None:
        """Poll whatever is due, then sleep until the next is (until cancelled)."""
        await asyncio.sleep(min(self.interval, FIRST_POLL_SECONDS))
        while True:
            wake = self.clock() + self.interval
            for name in self.upstreams:
                try:
                    result = await self.poll(name)
                except Exception:  # a bug must not end the loop: the next round tries again
                    log.exception("update feed poll of %s", name)
                    continue
                due = result.get("next_poll_at")
                if isinstance(due, float):
                    wake = min(wake, due)
            # At least a second apart; at most an interval, to notice a replica that stopped.
            await asyncio.sleep(min(self.interval, max(1.0, wake - self.clock())))

    async def poll(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Poll ``name``'s feeds if due (``force``: now), unless another process is at it."""
        state = self.states[name]
        async with self._locks[name]:
            state.polling = True
            try:
                result = await self._poll_if_free(name, force)
            finally:
                state.polling = False
        state.polls[result["outcome"]] += 1
        state.last = result
        return result

    async def _poll_if_free(self, name: str, force: bool) -> dict[str, Any]:
        lease = await asyncio.to_thread(self.ledger.acquire, name)
        if lease is None:
            return {"outcome": "busy", "next_poll_at": self.clock() + min(self.interval, 60.0)}
        try:
            position = await asyncio.to_thread(self.ledger.read, name)
            due = next_poll_at(
                position.last_success, position.last_attempt, position.failures, self.interval
            )
            if not force and due > self.clock():
                return {"outcome": "not_due", "next_poll_at": due}
            wait = forced_wait(position.last_attempt, self.forced_min_seconds, self.clock())
            if force and wait > 0:
                # Forced polls in a loop (every client is an admin in open mode) must not turn
                # the gateway into a load generator against TCIA: one per interval, replicas
                # included (the attempt time is the shared position's).
                return {"outcome": "too_soon", "retry_after": wait, "next_poll_at": due}
            return await self._poll(name, position)
        finally:
            await asyncio.to_thread(lease.release)

    async def _poll(self, name: str, position: Position) -> dict[str, Any]:
        started = self.clock()
        upstream = self.upstreams[name]
        try:
            oldest = None
            if position.last_success is None:
                oldest = await asyncio.to_thread(self.cache.store.oldest, name)
            since = window_start(position.last_success, oldest, started)
            form, updated = await self._updated_series(upstream, since, position.form)
            news: dict[str, list[dict[str, Any]]] = {}
            held = await asyncio.to_thread(self.cache.store.collections, name)
            for collection in await self._known_collections(upstream, held):
                news[collection] = [
                    *await self._collection_feed(
                        upstream, "NewPatientsInCollection", collection, since
                    ),
                    *await self._collection_feed(
                        upstream, "NewStudiesInPatientCollection", collection, since
                    ),
                ]
            plan = purge_plan(updated, news, position.seen)
            entries, size = await self.cache.purge_tagged(name, plan.tags)
            files = file_bytes = 0
            if self.binaries is not None:
                for uid in sorted(plan.series):
                    dropped, dropped_bytes = await asyncio.to_thread(
                        self.binaries.purge, series=uid
                    )
                    files += dropped
                    file_bytes += dropped_bytes
            await asyncio.to_thread(self.ledger.succeeded, name, started, plan.seen, form)
        except Exception as exc:  # the upstream, the answer or the database: back off
            reason = _describe(exc)
            log.warning("update feeds of %s: poll failed (%s); backing off", name, reason)
            failures = position.failures + 1
            try:
                await asyncio.to_thread(self.ledger.failed, name, started, reason)
                failures = (await asyncio.to_thread(self.ledger.read, name)).failures
            except Exception as recording:  # the database itself: this process backs off alone
                log.warning("update feeds of %s: %s", name, describe_failure(recording))
            due = started + backoff_seconds(failures, self.interval)
            return {
                "outcome": "failed",
                "error": reason,
                "failures": failures,
                "next_poll_at": due,
            }
        if plan.changed:
            log.info(
                "update feeds of %s since %s: %d changed (%d seen before): purged %d answers, "
                "%d kept files",
                name,
                since.isoformat(),
                plan.changed,
                plan.repeated,
                entries,
                files,
            )
        return {
            "outcome": "ok",
            "since": since.isoformat(),
            "form": form,
            "rows": len(updated),
            "collections_asked": len(news),
            "changed": plan.changed,
            "repeated": plan.repeated,
            "changed_series": sorted(plan.series),
            "purged_entries": entries,
            "purged_bytes": size,
            "purged_files": files,
            "purged_file_bytes": file_bytes,
            "next_poll_at": started + self.interval,
        }

    def positions(self) -> list[Position]:
        """Every upstream's shared position (blocking)."""
        return [self.ledger.read(name) for name in self.states]

    async def document(self) -> dict[str, Any]:
        """The feeds as ``/_proxy/cache/stats`` shows them: the shared position of each
        upstream (every replica's) and what this process polled."""
        shown: dict[str, Any] = {"poll_seconds": self.interval, "upstreams": {}}
        for name, state in self.states.items():
            position = await asyncio.to_thread(self.ledger.read, name)
            due = next_poll_at(
                position.last_success, position.last_attempt, position.failures, self.interval
            )
            shown["upstreams"][name] = {
                "last_success": _when(position.last_success),
                "last_attempt": _when(position.last_attempt),
                "failures": position.failures,
                "last_error": position.last_error,
                "form": position.form,
                "next_poll": _when(due if due != float("-inf") else None),
                "polling_now": state.polling,
                "polls": dict(state.polls),
                "last_poll": state.last or None,
            }
        return shown

    async def _updated_series(
        self, upstream: Upstream, since: dt.date, known: Form | None
    ) -> tuple[Form, list[dict[str, Any]]]:
        """getUpdatedSeries in the form the upstream serves: v2 first, v4 where v2 is not."""
        if known != "v4":
            query = urlencode({"fromDate": feed_date(since, "v2")})
            status, rows = await self._ask(
                upstream, "v2/getUpdatedSeries", query, TokenUse.REQUIRED
            )
            if status == 200:
                return "v2", rows
            if status not in _NO_V2:
                raise FeedError(f"v2/getUpdatedSeries answered {status}")
        query = urlencode({"fromDate": feed_date(since, "v4")})
        status, rows = await self._ask(upstream, "v4/getUpdatedSeries", query, TokenUse.OPTIONAL)
        if status != 200:
            raise FeedError(f"v4/getUpdatedSeries answered {status}")
        return "v4", rows

    async def _known_collections(self, upstream: Upstream, held: list[str]) -> list[str]:
        """The collections of ``held`` (named by cached requests: any client's words) that the
        upstream lists. A client asking for ten thousand made-up collections must not make
        every poll ask TCIA twenty thousand questions; one it does not list has nothing new,
        and an updated series names its collection in getUpdatedSeries anyway."""
        if not held:
            return []
        status, rows = await self._ask(upstream, "v4/getCollectionValues", "", TokenUse.OPTIONAL)
        if status != 200:
            raise FeedError(f"v4/getCollectionValues answered {status}")
        listed = (row.get("Collection") for row in rows)
        known = {name.strip().casefold() for name in listed if isinstance(name, str)}
        return [collection for collection in held if collection.casefold() in known]

    async def _collection_feed(
        self, upstream: Upstream, feed: str, collection: str, since: dt.date
    ) -> list[dict[str, Any]]:
        query = urlencode({"Collection": collection, "fromDate": feed_date(since, "v4")})
        status, rows = await self._ask(upstream, f"v4/{feed}", query, TokenUse.OPTIONAL)
        if status != 200:
            raise FeedError(f"v4/{feed} answered {status} for {collection[:60]}")
        return rows

    async def _ask(
        self, upstream: Upstream, path: str, query: str, token_use: TokenUse
    ) -> tuple[int, list[dict[str, Any]]]:
        """One feed request through the shield: its status and, for a 200, its JSON rows."""
        await _after_clients(upstream)
        request = OutgoingRequest(
            "GET",
            _SERVICES + path.encode(),
            query.encode(),
            [(b"accept", b"application/json")],
            b"",
        )
        response = await open_shielded(
            upstream, request, token_use, self.token_on_v4, retry=self.retry
        )
        if response.status_code != 200:
            await response.aclose()
            return response.status_code, []
        encoding = (response.headers.get("content-encoding") or "").strip().lower()
        body = await read_bounded(response, upstream.name, FEED_MAX_BYTES)
        if not isinstance(body, bytes):
            with contextlib.suppress(Exception):
                await body.response.aclose()
            raise FeedError(f"{path} answered more than {FEED_MAX_BYTES} bytes")
        return 200, _rows(body, encoding, path)


def forced_wait(last_attempt: float | None, minimum: float, now: float) -> float:
    """Seconds until a forced poll may ask the upstream again (0: now), ``minimum`` seconds
    after the last attempt of any replica; a clock gone back waits no longer than ``minimum``."""
    if last_attempt is None or minimum <= 0:
        return 0.0
    return max(0.0, min(minimum, last_attempt + minimum - now))


async def _after_clients(upstream: Upstream) -> None:
    """Let the clients queued for the upstream go first (the poll is the least urgent
    request there is), for up to a minute: then it queues like anyone."""
    for _ in range(int(YIELD_SECONDS / 0.1)):
        if upstream.limiter.waiting == 0:
            return
        await asyncio.sleep(0.1)


def _rows(body: bytes, encoding: str, path: str) -> list[dict[str, Any]]:
    """A feed's JSON answer as rows; an empty body is no rows (NBIA's answer to "none")."""
    try:
        if encoding == "gzip":
            body = _gunzip_bounded(body, FEED_MAX_BYTES, path)
        if not body.strip():
            return []
        items = json.loads(body)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise FeedError(f"{path} answered something other than JSON") from exc
    if not isinstance(items, list):
        raise FeedError(f"{path} answered JSON that is not a list")
    return [item for item in items if isinstance(item, dict)]


def _gunzip_bounded(body: bytes, limit: int, path: str) -> bytes:
    """``body`` gunzipped, refused past ``limit`` bytes: a few kilobytes of gzip can stand for
    gigabytes (``gzip.decompress`` would hold them all), and the feed's size limit is on what
    is read, not on what it unpacks to."""
    parts: list[bytes] = []
    size = 0
    rest = body
    while rest:  # one gzip member after another, as gzip.decompress reads them
        unpacker = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        chunk = unpacker.decompress(rest, limit - size + 1)
        size += len(chunk)
        if size > limit or unpacker.unconsumed_tail:
            raise FeedError(f"{path} answered more than {limit} bytes once unpacked")
        parts.append(chunk)
        if not unpacker.eof:
            raise EOFError("the gzip stream ends early")
        rest = unpacker.unused_data.lstrip(b"\0")  # gzip allows zero padding between members
    return b"".join(parts)


def _when(seconds: float | None) -> str | None:
    """Wall-clock seconds as an ISO 8601 UTC time."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _describe(exc: BaseException) -> str:
    """A failed poll's reason, for the log and the stats (the gateway's words: no secrets)."""
    if isinstance(exc, FeedError):
        return str(exc)
    if isinstance(exc, GatewayError):
        return str(getattr(exc, "message", "") or type(exc).__name__)[:300]
    return describe_failure(exc)

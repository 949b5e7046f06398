"""The database is a cache, not a dependency: while it is unreachable requests are relayed.

PostgreSQL is reached through a TCP relay the test cuts (connections closed and new ones
refused) or stalls (connections accepted, nothing forwarded: what a dead host or a partition
looks like); SQLite is "locked" by making its reads wait, as a reader behind a lock waits out
its busy timeout. During the outage misses are relayed with the upstream's bodies, memory
copies are still hits, series zips are relayed, the outage is logged once and counted, and
afterwards the cache works again: MISS, then HIT, and the answer reaches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from proxy.cache.tiers import TieredCache
from proxy.db import is_unreachable, migrate
from proxy.store_health import StoreHealth
from tests.databases import database
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayFactory, GatewayServer
from tests.test_failsafe_access import accounts_settings, add_user, bearer

S = "/nbia-api/services"
OUTAGE = "the database is unreachable"
WARM = f"{S}/v4/getCollectionValues"  # held in memory before each outage


class Relay:
    """A TCP relay to ``target`` on a free loopback port, run by asyncio in a thread.

    ``cut()`` closes every relayed connection and closes new ones at once; ``stall()`` keeps
    new connections open without forwarding anything; ``restore()`` relays again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.mode = "relay"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def cut(self) -> None:
        self._switch("cut")

    def stall(self) -> None:
        self._switch("stall")

    def restore(self) -> None:
        self._switch("relay")

    def _switch(self, mode: str) -> None:
        done = threading.Event()

        def switch() -> None:
            self.mode = mode
            if mode != "relay":
                for writer in list(self._writers):
                    writer.close()
                self._writers.clear()
            done.set()

        self._loop.call_soon_threadsafe(switch)
        done.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.close()
            return
        self._writers.add(writer)
        if self.mode == "stall":
            return  # held open, never answered, until a cut or the end
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with database("postgresql", tmp_path) as url:
        migrate(url)
        yield url


@pytest.fixture
def relay(postgres_url: str) -> Iterator[Relay]:
    real = make_url(postgres_url)
    with Relay(real.host or "127.0.0.1", real.port or 5432) as running:
        yield running


def relayed(url: str, relay: Relay) -> str:
    return make_url(url).set(host="127.0.0.1", port=relay.port).render_as_string(False)


def get(gw: GatewayServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(gw.url + path, timeout=60, **kwargs)


def direct(fake: FakeServer, path: str) -> bytes:
    """What the upstream itself answers."""
    return httpx.get(fake.url + path, timeout=60).content


def cache_of(gw: GatewayServer) -> TieredCache:
    cache = gw.app.cache
    assert cache is not None
    return cache


def outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if OUTAGE in r.getMessage()]


def series_path(fake: FakeServer) -> str:
    uid = next(s.uid for s in fake.app.dataset.series if s.collection == "4D-Lung")
    return f"{S}/v4/getImage?SeriesInstanceUID={uid}"


@pytest.fixture
def outage_gateway(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> GatewayFactory:
    """Run gateways whose database reads are bounded by ``timeout`` seconds (retried every
    0.2 s), each holding WARM in memory and in the database once started.

    Every lookup asks the database (no recheck interval): the memory copy must stand in while
    it cannot answer. The outage log lines are captured (``outage_lines``).
    """
    caplog.set_level(logging.INFO)

    @contextlib.contextmanager
    def run(timeout: float, **extra: Any) -> Iterator[GatewayServer]:
        with make_gateway(
            cache_recheck_seconds=0,
            database_timeout_seconds=timeout,
            database_retry_seconds=0.2,
            **extra,
        ) as gw:
            assert get(gw, WARM).headers["x-cache"] == "MISS"
            assert get(gw, WARM).headers["x-cache"] == "HIT"
            cache_of(gw).writer.flush()
            yield gw

    return run


def until_state(cache: TieredCache, state: str, poke: Callable[[int], None] | None = None) -> None:
    """Wait (10 s at most) for the database's health to be ``state``; ``poke(attempt)`` runs
    before each look (e.g. a request, so the gateway tries the database again)."""
    for attempt in range(200):
        if poke is not None:
            poke(attempt)
        if cache.health.state == state:
            return
        threading.Event().wait(0.05)
    assert cache.health.state == state


def during_outage(gw: GatewayServer, nbia: FakeServer) -> None:
    """Misses relayed with the upstream's bodies, the warm copy a hit, a series zip relayed."""
    cache = cache_of(gw)
    for collection in ("TCGA-KIRC", "LIDC-IDRI", "4D-Lung"):
        path = f"{S}/v4/getSeries?Collection={collection}"
        answer = get(gw, path)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-cache"] == "MISS"
        assert answer.content == direct(nbia, path)
    hit = get(gw, WARM)
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
    zipped = get(gw, series_path(nbia))
    assert zipped.status_code == 200
    assert zipped.content == direct(nbia, series_path(nbia))
    health = cache.health
    assert health.state == "unreachable"
    # Every read of the database during the outage failed within the bound or was skipped:
    # none of the four lookups found an answer there, and none failed the request.
    assert health.errors.get("read", 0) + health.skipped.get("read", 0) >= 4
    body = get(gw, "/healthz").json()
    assert body["database"] == "unreachable"
    stats = get(gw, "/_proxy/cache/stats")
    assert stats.status_code == 200
    assert stats.json()["database"]["state"] == "unreachable"
    assert "nbia_proxy_store_errors_total" in get(gw, "/metrics").text


def after_outage(gw: GatewayServer, restore: Any) -> None:
    """Back to normal: the database answers again, a new key is MISS then HIT, and stored."""
    cache = cache_of(gw)
    restore()
    path = f"{S}/v4/getSeries?Collection=RIDER Lung CT"

    def probe(attempt: int) -> None:  # a request tries the database again
        answer = get(gw, f"{S}/v4/getBodyPartValues?Collection=probe{attempt}")
        assert answer.status_code == 200

    until_state(cache, "ok", probe)
    first, second = get(gw, path), get(gw, path)
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    # An answer relayed during the outage never reached the database: it is fetched and
    # stored again now, rather than its memory copy standing in for a row that is not there.
    during = f"{S}/v4/getSeries?Collection=TCGA-KIRC"
    again, then = get(gw, during), get(gw, during)
    assert again.headers["x-cache"] == "MISS" and then.headers["x-cache"] == "HIT"
    assert cache.writer.skipped_unreachable >= 1
    cache.writer.flush()
    digest = next(iter(cache._memory.keys()))  # noqa: SLF001 -- any entry will do
    assert cache.store.get(digest) is not None or cache.writer.written > 0
    assert get(gw, "/healthz").json()["database"] == "ok"
    # No download of the outage was kept without its row: every kept file is named by one.
    series = gw.app.series
    assert series is not None
    binaries = series.store
    named = {binaries.path_for(digest, sha256) for digest, sha256 in binaries._rows()}  # noqa: SLF001
    root = binaries.directory
    kept = {
        p for p in root.rglob("*") if p.is_file() and p.name[0] != "." and ".part-" not in p.name
    }
    assert kept <= named


@pytest.mark.parametrize("failure", ["cut", "stall"])
def test_postgresql_unreachable_misses_are_relayed_hits_still_hit_one_log_line(
    failure: str,
    postgres_url: str,
    relay: Relay,
    outage_gateway: GatewayFactory,
    nbia_upstream: FakeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with outage_gateway(0.5, database_url=relayed(postgres_url, relay)) as gw:
        relay.cut() if failure == "cut" else relay.stall()
        during_outage(gw, nbia_upstream)
        after_outage(gw, relay.restore)
    lines = outage_lines(caplog)
    assert len(lines) == 1, lines
    assert "Traceback" not in caplog.text


def test_sqlite_locked_misses_are_relayed_within_the_bound(
    outage_gateway: GatewayFactory,
    nbia_upstream: FakeServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unlocked = threading.Event()
    unlocked.set()

    def behind_the_lock(*_: Any) -> None:
        # A reader of a locked file waits out SQLite's busy timeout (30 s), then fails.
        if not unlocked.wait(30):
            raise sqlite3.OperationalError("database is locked")

    with outage_gateway(0.3) as gw:
        cache = cache_of(gw)
        # One file: the lock holds for the cache, the kept files' rows and the accounts alike.
        series, registry = gw.app.series, gw.app.access.registry
        engines = {cache.store.engine}
        engines |= {series.store.engine} if series is not None else set()
        engines |= {registry.engine} if registry is not None else set()
        for engine in engines:
            event.listen(engine, "before_cursor_execute", behind_the_lock)
        try:
            unlocked.clear()
            during_outage(gw, nbia_upstream)
            # Mostly the bound ends a read; a write that SQLite itself found locked meanwhile
            # (its own lock, taken by a held writer) is the same outage, seen first.
            reason = str(cache.health.reason)
            assert "no answer within 0.3 s" in reason or reason == "database is locked", reason
            after_outage(gw, unlocked.set)
        finally:
            unlocked.set()
    lines = outage_lines(caplog)
    assert len(lines) == 1, lines


def test_accounts_known_keys_work_unknown_ones_get_503_while_the_database_is_down(
    tmp_path: Path,
    postgres_url: str,
    relay: Relay,
    nbia_upstream: FakeServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data_dir = tmp_path / "data"
    url = relayed(postgres_url, relay)
    key = add_user(data_dir, "ada", capsys, url=url)
    settings = accounts_settings(
        data_dir, nbia_upstream, database_url=url, database_timeout_seconds=0.5
    )
    path = f"{S}/v4/getSeries?Collection=TCGA-KIRC"
    with GatewayServer(settings) as gw:
        assert get(gw, path, headers=bearer(key)).status_code == 200
        relay.cut()
        cache = cache_of(gw)
        until_state(cache, "unreachable")  # the accounts refresher (every 0.2 s) finds it
        other = f"{S}/v4/getSeries?Collection=LIDC-IDRI"
        known = get(gw, other, headers=bearer(key))
        assert known.status_code == 200 and known.headers["x-cache"] == "MISS"
        unknown = get(gw, path, headers=bearer("nbp_" + "x" * 40))
        assert unknown.status_code == 503
        assert "accounts database is unreachable" in unknown.json()["error"]
        relay.restore()
        until_state(cache, "ok")
        assert get(gw, path, headers=bearer("nbp_" + "x" * 40)).status_code == 401


# --- the policy alone (no sockets) -------------------------------------------------------------


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def locked() -> OperationalError:
    return OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))


def test_an_outage_skips_the_database_between_attempts_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Ticks()
    health = StoreHealth(timeout_seconds=0.5, retry_seconds=1.0, clock=clock)
    assert not health.skipping("read") and health.state == "ok"
    health.failed("read", locked())
    assert health.state == "unreachable" and health.reason == "database is locked"
    assert health.skipping("read") and health.skipping("write")
    clock.now += 1.0
    assert not health.skipping("read")  # one attempt after the pause...
    assert health.skipping("read")  # ...and the others still skip while it runs
    health.failed("read", TimeoutError())
    assert "no answer within 0.5 s" in str(health.reason)
    health.succeeded()
    assert health.state == "ok" and not health.skipping("read")
    assert health.errors == {"read": 2} and health.skipped == {"read": 2, "write": 1}
    clock.now += 5.0  # flapping within a minute: counted, not logged again
    health.failed("write", locked())
    health.succeeded()
    clock.now += 60.0
    health.failed("write", locked())
    lines = outage_lines(caplog)
    assert len(lines) == 2 and health.outages == 3, lines
    ends = [r for r in caplog.records if "answers again after" in r.getMessage()]
    assert len(ends) == 1


def test_what_counts_as_unreachable() -> None:
    assert is_unreachable(locked())
    assert is_unreachable(PoolTimeout("QueuePool limit reached"))
    assert is_unreachable(TimeoutError())
    full = OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))
    full.orig.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[union-attr]
    assert not is_unreachable(full)  # the writer reports a full disk on its own
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    readonly.sqlite_errorcode = sqlite3.SQLITE_READONLY  # type: ignore[attr-defined]
    assert not is_unreachable(OperationalError("INSERT", {}, readonly))
    assert not is_unreachable(ValueError("not a database error"))

"""Several gateways as one: two replicas (or workers) on one PostgreSQL database and one Redis
(``redis_url``), one shared data dir, nginx in front, real processes.

Each test has its own PostgreSQL schema and its own Redis key prefix (other test runs share
both servers). Redis is found at ``NBIA_PROXY_TEST_REDIS_URL`` (default the local one); when it
does not answer these tests skip, unless ``NBIA_PROXY_TEST_REQUIRE_REDIS=1`` (``.ci/run``).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import threading
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.types import Message, Receive, Scope, Send

from bench.common import find_nginx, start_nginx, stop_processes
from proxy.accounts.registry import Registry
from proxy.app import build_audit_log, describe
from proxy.audit import OFF as AUDIT_OFF
from proxy.config import InvalidSettings, load_settings
from proxy.db import make_engine, migrate
from proxy.shield.counters import ShieldCounters
from proxy.shield.shared import Leases, SharedAccounts, SharedLimits, SharedStore, StoreDown
from tests.databases import database
from tests.fake_nbia import FakeServer
from tests.fake_nbia.app import FakeNBIA
from tests.fake_nbia.faults import is_token_path
from tests.gateway_server import GatewayProcess, free_port

pytestmark = pytest.mark.timeout(240)

S = "/nbia-api/services"
REDIS_URL = os.environ.get("NBIA_PROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _require_redis() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {exc}"
        if os.environ.get("NBIA_PROXY_TEST_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


class CountingNBIA(FakeNBIA):
    """The fake NBIA, counting data requests in flight (arrival to response head) at once."""

    def __init__(self) -> None:
        super().__init__()
        self._count = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def reset(self) -> None:
        super().reset()
        self.peak = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_token_path(scope["path"]):
            await super().__call__(scope, receive, send)
            return
        with self._count:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        answered = False

        def done() -> None:
            nonlocal answered
            if not answered:
                answered = True
                with self._count:
                    self.in_flight -= 1

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                done()  # the gateway's slot is held until the head arrives
            await send(message)

        try:
            await super().__call__(scope, receive, counted)
        finally:
            done()


@pytest.fixture(scope="module")
def counting_fake() -> Iterator[FakeServer]:
    server = FakeServer(CountingNBIA())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake(counting_fake: FakeServer) -> FakeServer:
    counting_fake.app.reset()
    return counting_fake


class Deployment:
    """Gateways on one database, one Redis prefix and one data dir, nginx in front."""

    def __init__(self, url: str, database_url: str, prefix: str, data_dir: Path) -> None:
        self.url = url  # nginx
        self.database_url = database_url
        self.prefix = prefix
        self.data_dir = data_dir
        self.gateways: list[GatewayProcess] = []

    def get(self, path: str, via: str | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.get((via or self.url) + path, timeout=60, **kwargs)

    def burst(self, paths: list[str], **kwargs: Any) -> list[httpx.Response]:
        """All of ``paths`` at once through nginx (one thread each)."""
        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(lambda p: self.get(p, **kwargs), paths))


@pytest.fixture
def deploy(tmp_path: Path, fake: FakeServer) -> Iterator[Callable[..., Deployment]]:
    """``deploy(*flags, replicas=2, redis_url=..., users=[...])``: start a deployment."""
    _require_redis()
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    stack = ExitStack()
    prefixes: list[str] = []

    def start(
        *flags: str,
        replicas: int = 2,
        redis_url: str = REDIS_URL,
        users: tuple[str, ...] = (),
    ) -> Deployment:
        url = stack.enter_context(database("postgresql", tmp_path))
        migrate(url)  # once, before the replicas start (as deploy/ does)
        keys = {}
        if users:
            engine = make_engine(url)
            registry = Registry(engine, time.time)
            keys = {name: registry.add(name) for name in users}
            engine.dispose()
        prefix = f"nbia-proxy-test-{uuid.uuid4().hex[:12]}:"
        prefixes.append(prefix)
        data = tmp_path / "data"
        common = [
            "--database-url", url, "--redis-url", redis_url, "--redis-prefix", prefix,
            "--audit-log", "", *flags,
        ]  # fmt: skip
        deployment = Deployment("", url, prefix, data)
        deployment.keys = keys  # type: ignore[attr-defined]
        for n in range(replicas):
            gateway = GatewayProcess(fake.url, data, *common, stderr=tmp_path / f"gateway-{n}.log")
            stack.enter_context(gateway)
            deployment.gateways.append(gateway)
        servers = " ".join(f"server 127.0.0.1:{g.port};" for g in deployment.gateways)
        process, deployment.url = start_nginx(
            nginx,
            "http://gateways",
            tmp_path / f"nginx-{len(prefixes)}",
            http=f"upstream gateways {{ {servers} }}",
            location="proxy_read_timeout 120s;",
        )
        stack.callback(stop_processes, [process])
        return deployment

    try:
        yield start
    finally:
        stack.close()
        client = redis.Redis.from_url(REDIS_URL)
        for prefix in prefixes:
            for key in client.scan_iter(match=prefix + "*"):
                client.delete(key)


def _user(deployment: Deployment, name: str = "ada") -> dict[str, str]:
    keys: dict[str, str] = deployment.keys  # type: ignore[attr-defined]
    return {"authorization": f"Bearer {keys[name]}"}


def _series(fake: FakeServer) -> str:
    return str(fake.app.dataset.series[0].uid)


def test_the_upstream_concurrency_cap_holds_in_total(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    fake.app.slow(seconds_before_headers=0.3, path_contains="getSeries")
    deployment = deploy("--upstream-max-concurrency", "3")
    answers = deployment.burst([f"{S}/v1/getSeries?Collection=C{i}" for i in range(24)])
    assert [a.status_code for a in answers] == [200] * 24
    assert len(fake.app.requests_to("/v1/getSeries")) == 24
    assert fake.app.peak == 3  # the cap reached, and never the cap of each replica added up


def test_a_users_rate_holds_in_total(deploy: Callable[..., Deployment], fake: FakeServer) -> None:
    deployment = deploy(
        "--access", "accounts", "--user-rate-per-second", "2",
        users=("ada",),
    )  # fmt: skip
    started = time.monotonic()
    statuses = [
        deployment.get(f"{S}/v1/getCollectionValues?n={i}", headers=_user(deployment)).status_code
        for i in range(12)
    ]
    earned = 2 * (time.monotonic() - started)  # tokens refilled during the run
    assert set(statuses) <= {200, 429}
    # A burst of 2 for the whole deployment (each replica on its own would admit 2 and more).
    assert statuses.count(200) <= 2 + int(earned) + 1
    assert statuses.count(429) >= 12 - 2 - int(earned) - 1


def test_a_lockout_on_one_replica_applies_on_the_other(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    deployment = deploy(
        "--access", "accounts", "--login-free-failures", "2", "--login-lockout-max-seconds", "60",
        users=("ada",),
    )  # fmt: skip
    first, second = deployment.gateways
    wrong = {"authorization": "Bearer not-a-key"}
    for _ in range(6):  # two free, then locked out for 1, 2, 4, 8 s
        deployment.get(f"{S}/v1/getCollectionValues", via=first.url, headers=wrong)
    refused = deployment.get(f"{S}/v1/getCollectionValues", via=second.url, headers=wrong)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 2
    # A valid key still gets in from the locked-out address, on either replica.
    ok = deployment.get(f"{S}/v1/getCollectionValues", via=second.url, headers=_user(deployment))
    assert ok.status_code == 200


def test_identical_cold_requests_over_both_replicas_make_one_upstream_request(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    fake.app.slow(seconds_before_headers=0.5, path_contains="getCollectionValues")
    deployment = deploy()
    answers = deployment.burst([f"{S}/v1/getCollectionValues"] * 50)
    assert [a.status_code for a in answers] == [200] * 50
    assert len({a.content for a in answers}) == 1
    assert len(fake.app.requests_to("/v1/getCollectionValues")) == 1


def test_a_cold_series_zip_over_both_replicas_is_downloaded_once(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    fake.app.slow(seconds_between_chunks=0.02, path_contains="getImage")
    deployment = deploy()
    path = f"{S}/v4/getImage?SeriesInstanceUID={_series(fake)}"
    answers = deployment.burst([path] * 10)
    assert [a.status_code for a in answers] == [200] * 10
    assert len({a.content for a in answers}) == 1
    assert len(fake.app.requests_to("/v4/getImage")) == 1


def test_a_replica_killed_during_a_fill_holds_the_others_up_no_longer_than_its_lease(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    fake.app.set_big_zip_bytes(400_000)  # 100 slow pieces: seconds of filling
    fake.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
    deployment = deploy("--shared-lease-seconds", "1")
    first, second = deployment.gateways
    path = f"{S}/v4/getImage?SeriesInstanceUID={fake.app.big_series_uid}"
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(deployment.get, path, via=first.url)
        assert _wait_for(lambda: fake.app.requests_to("/v4/getImage") or None)
        waiting = pool.submit(deployment.get, path, via=second.url)
        time.sleep(0.5)
        # The second replica waits for the first one's fill rather than download it again.
        assert len(fake.app.requests_to("/v4/getImage")) == 1
        assert first.process is not None
        first.process.kill()
        answer = waiting.result()
        with pytest.raises(httpx.HTTPError):
            doomed.result()
    assert answer.status_code == 200
    assert zipfile.ZipFile(io.BytesIO(answer.content)).testzip() is None  # whole, not partial
    assert len(fake.app.requests_to("/v4/getImage")) == 2  # the second replica refetched


def test_the_breaker_opened_by_one_replica_is_seen_by_the_other_and_both_recover(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    deployment = deploy(
        "--circuit-failure-threshold", "2", "--circuit-probe-seconds", "0.3",
        "--circuit-cooldown-seconds", "1", "--cache-max-stale-seconds", "0",
    )  # fmt: skip
    first, second = deployment.gateways
    fake.app.fail_next(10_000, 502)
    for i in range(2):
        assert deployment.get(f"{S}/v1/getSeries?Collection=X{i}", via=first.url).status_code
    circuit = _wait_for(lambda: _circuit(second) == "open" or None)
    assert circuit
    before = len(fake.app.requests)
    refused = deployment.get(f"{S}/v1/getSeries?Collection=Y", via=second.url)
    assert refused.status_code == 503
    assert not [r for r in fake.app.requests[before:] if "Collection=Y" in r.query]
    fake.app.faults.reset()  # the upstream is back
    assert _wait_for(lambda: _circuit(first) == _circuit(second) == "closed" or None)
    for gateway in deployment.gateways:
        answer = deployment.get(f"{S}/v1/getSeries?Collection=Z", via=gateway.url)
        assert answer.status_code == 200


def test_three_workers_hold_the_same_totals(
    deploy: Callable[..., Deployment], fake: FakeServer
) -> None:
    fake.app.slow(seconds_before_headers=0.3, path_contains="getSeries")
    deployment = deploy("--workers", "3", "--upstream-max-concurrency", "2", replicas=1)
    answers = deployment.burst([f"{S}/v1/getSeries?Collection=W{i}" for i in range(18)])
    assert [a.status_code for a in answers] == [200] * 18
    assert fake.app.peak == 2
    fake.app.slow(seconds_before_headers=0.5, path_contains="getCollectionValues")
    same = deployment.burst([f"{S}/v1/getCollectionValues?same=1"] * 30)
    assert [a.status_code for a in same] == [200] * 30
    assert len(fake.app.requests_to("/v1/getCollectionValues")) == 1


def test_without_redis_requests_are_relayed_and_sharing_resumes_when_it_is_back(
    deploy: Callable[..., Deployment], fake: FakeServer, tmp_path: Path
) -> None:
    port = free_port()
    deployment = deploy(
        "--redis-timeout-seconds", "0.2", "--upstream-rate-per-second", "100",
        redis_url=f"redis://127.0.0.1:{port}/0",
    )  # fmt: skip
    answers = deployment.burst([f"{S}/v1/getSeries?Collection=D{i}" for i in range(20)])
    assert [a.status_code for a in answers] == [200] * 20
    errors = _metric(deployment.gateways[0], "nbia_proxy_shared_store_errors_total")
    assert errors >= 1
    log = (tmp_path / "gateway-0.log").read_text()
    assert log.count("shared store unreachable") == 1  # said once, not per request
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = redis.Redis(port=port)
        assert _wait_for(lambda: _pings(client))
        bucket = f"{deployment.prefix}upstream:nbia:bucket"

        logs = [tmp_path / f"gateway-{n}.log" for n in range(2)]

        def shared_again() -> bool | None:
            for gateway in deployment.gateways:
                deployment.get(f"{S}/v1/getSeries?Collection=R{uuid.uuid4().hex}", via=gateway.url)
            resumed = all("shared store answers again" in log.read_text() for log in logs)
            return (resumed and bool(client.exists(bucket))) or None

        assert _wait_for(shared_again)  # both say so, and the rate is kept in Redis again
    finally:
        server.terminate()
        server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool | None:
    try:
        return bool(client.ping()) or None
    except redis.RedisError:
        return None


def _circuit(gateway: GatewayProcess) -> str:
    health = httpx.get(gateway.url + "/healthz", timeout=10).json()
    return str(health["upstreams"]["nbia"]["circuit"])


def _metric(gateway: GatewayProcess, name: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _wait_for(check: Callable[[], Any], seconds: float = 30.0) -> Any:
    """``check()`` until it returns something other than None (a guard against hangs, not a
    bound the test asserts)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result is not None:
            return result
        time.sleep(0.1)
    return None


# The primitives on their own, against the same Redis ---------------------------------------


def _store(url: str = REDIS_URL, timeout: float = 1.0) -> SharedStore:
    return SharedStore(url, f"nbia-proxy-test-{uuid.uuid4().hex[:12]}:", timeout, ShieldCounters())


@asynccontextmanager
async def _shared_store() -> AsyncIterator[SharedStore]:
    """A store on the shared test Redis, under a prefix of its own, emptied and closed after."""
    _require_redis()
    store = _store()
    try:
        yield store
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=store.prefix + "*"):
            client.delete(key)
        await store.aclose()


def test_a_slot_whose_holder_died_is_free_again_after_its_lease() -> None:
    async def run() -> None:
        async with _shared_store() as store:
            limits = SharedLimits(store, "nbia", cap=2, lease_seconds=1.0)
            held = [await limits.enter(0.0, time.monotonic() + 5) for _ in range(2)]
            assert all(held)
            with pytest.raises(TimeoutError):
                await limits.enter(0.0, time.monotonic() + 0.2)  # the cap holds
            # Still renewed while held: past the lease it is still taken.
            await asyncio.sleep(1.2)
            with pytest.raises(TimeoutError):
                await limits.enter(0.0, time.monotonic() + 0.1)
            limits._renewer.drop(str(held[0]))  # its holder dies: no more renewals
            assert await limits.enter(0.0, time.monotonic() + 5)

    asyncio.run(run())


def test_the_shared_rate_and_pause() -> None:
    async def run() -> None:
        async with _shared_store() as store:
            limits = SharedLimits(store, "nbia", cap=100, lease_seconds=5.0)
            # 2 per second: a burst of 2, then the third waits about half a second.
            for _ in range(2):
                assert await limits.enter(2.0, time.monotonic() + 5)
            with pytest.raises(TimeoutError) as raised:
                await limits.enter(2.0, time.monotonic() + 0.1)
            assert raised.value.args[0] == "pause" and 0.2 < raised.value.args[1] <= 0.5
            limits.pause(3.0)
            await asyncio.sleep(0.1)  # the pause is written in the background
            with pytest.raises(TimeoutError) as raised:
                await limits.enter(0.0, time.monotonic() + 1)
            assert raised.value.args[1] > 2

    asyncio.run(run())


def test_lockouts_grow_with_each_failure_past_the_free_ones() -> None:
    async def run() -> None:
        async with _shared_store() as store:
            accounts = SharedAccounts(store, 5.0)
            seen = [await accounts.failed("10.0.0.1", 2, 60, 600) for _ in range(5)]
            assert [round(now) for _, now, _ in seen] == [0, 0, 1, 2, 4]
            assert [new for _, _, new in seen] == [False, False, True, False, False]
            assert seen[3][0] > 0  # locked out already when the fourth came
            assert 3 < await accounts.locked_for("10.0.0.1") <= 4
            assert await accounts.locked_for("10.0.0.2") == 0

    asyncio.run(run())


def test_an_unreachable_store_answers_store_down_at_once_and_is_counted() -> None:
    async def run() -> None:
        store = _store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
        try:
            limits = SharedLimits(store, "nbia", cap=1, lease_seconds=5.0)
            assert await limits.enter(0.0, time.monotonic() + 5) is None  # caller's own limits
            assert store.counters.shared_store_errors == 1
            with pytest.raises(StoreDown):  # the next second goes straight to the fallback
                await store.call(lambda client: client.ping())
            assert store.counters.shared_store_errors == 1
        finally:
            await store.aclose()

    asyncio.run(run())


def test_redis_url_is_checked_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings) as raised:
        load_settings(redis_url="http://:hunter2@cache:6379/0")
    assert "redis://" in str(raised.value) and "hunter2" not in str(raised.value)
    settings = load_settings(redis_url="redis://:hunter2@cache:6379/0", data_dir=tmp_path)
    line = describe(settings, [], build_audit_log(settings))
    assert "shared store redis cache, prefix nbia-proxy:" in line and "hunter2" not in line
    assert "shared store off" in describe(load_settings(data_dir=tmp_path), [], AUDIT_OFF)


@pytest.fixture
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of this test's own, free to stop or kill: its URL and its process."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert _wait_for(lambda: _pings(redis.Redis(port=port)))
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait(timeout=10)


def test_a_gateway_stops_within_its_grace_with_redis_blackholed(
    fake: FakeServer, tmp_path: Path, private_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    """Redis stopped dead (SIGSTOP: the kernel still accepts connections, nothing answers),
    the nasty kind of gone: requests are relayed and SIGTERM stops the gateway within its
    shutdown grace, its shared-store tasks and connections included."""
    url, server = private_redis
    grace = 1.0
    gateway = GatewayProcess(
        fake.url, tmp_path / "data", "--redis-url", url,
        "--redis-prefix", "nbia-proxy-test-blackholed:", "--redis-timeout-seconds", "0.2",
        "--shutdown-grace-seconds", str(grace), "--audit-log", "",
        stderr=tmp_path / "gateway.log",
    )  # fmt: skip
    with gateway:
        paths = [f"{S}/v1/getSeries?Collection=U{i}" for i in range(8)]
        with ThreadPoolExecutor(len(paths)) as pool:  # slots, leases and pooled connections
            assert {a.status_code for a in pool.map(_get(gateway), paths)} == {200}
        server.send_signal(signal.SIGSTOP)
        paths = [f"{S}/v1/getSeries?Collection=B{i}" for i in range(8)]
        with ThreadPoolExecutor(len(paths)) as pool:
            assert {a.status_code for a in pool.map(_get(gateway), paths)} == {200}
        # The grace, the unwind, and a margin for a loaded machine: past that it hangs.
        assert gateway.stop(timeout=grace + 1 + 20) == 0


def _get(gateway: GatewayProcess) -> Callable[[str], httpx.Response]:
    return lambda path: httpx.get(gateway.url + path, timeout=60)


def test_closing_the_store_with_redis_stopped_dead_ends_every_task_of_its_own(
    private_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """At shutdown: a held slot's lease renewals and a fill's lease stop with the store, and
    no call opens a connection to the dead Redis afterwards."""
    url, server = private_redis

    async def run() -> None:
        store = _store(url, timeout=0.2)
        limits = SharedLimits(store, "nbia", cap=2, lease_seconds=1.0)
        assert await limits.enter(0.0, time.monotonic() + 5)  # held: renewed every 1/3 s
        leases = Leases(store, "fill", lease_seconds=1.0)
        token, _ = await leases.take("series")
        assert token is not None
        store.spawn(leases.keep("series", token, asyncio.Event().wait()))  # a fill going on
        await asyncio.sleep(0.5)  # a renewal or two
        server.send_signal(signal.SIGSTOP)
        await store.aclose()
        left = asyncio.all_tasks() - {asyncio.current_task()}
        assert not left, left
        with pytest.raises(StoreDown):
            await store.call(lambda client: client.ping())
        assert store.counters.shared_store_errors == 0  # refused here, never sent

    asyncio.run(run())


def test_a_store_whose_connections_fail_to_close_still_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing is the gateway's shutdown: a Redis that fails it must not skip the rest."""

    async def run() -> None:
        store = _store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)

        async def fails() -> None:
            raise redis.exceptions.TimeoutError("Timed out closing connection after 0.2")

        monkeypatch.setattr(store.client, "aclose", fails)
        await store.aclose()
        assert store.closed

    asyncio.run(run())

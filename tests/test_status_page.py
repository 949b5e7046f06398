"""The status page: ``/_proxy/status`` (JSON) and ``/_proxy/`` (HTML, also in a real browser).

The policy parts (the per-minute ring, the warnings, the rendering and its escaping) are tested
as pure functions; the rest against a gateway in front of the fake NBIA, with some traffic and
a slow download under way.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from selenium.webdriver.common.by import By

from proxy.accounts.registry import Registry
from proxy.db import database_url, make_engine, migrate
from proxy.errors import ServiceTokenError
from proxy.service_token import ServiceToken
from proxy.status import (
    CACHE_FIGURES_SECONDS,
    DOWNLOADS_SHOWN,
    Alert,
    CacheStatus,
    ClassFigures,
    CollectionFigures,
    Disk,
    Download,
    LoggedError,
    MinuteRing,
    MinuteTally,
    Rates,
    Snapshot,
    StatusBoard,
    TokenStatus,
    UpstreamStatus,
    alerts_for,
    named_series,
    rates_of,
    shown_downloads,
    upstream_status,
)
from proxy.status_page import render
from tests.browser import chromium, off_the_machine, requested_urls, screenshot
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _series(fake: FakeServer, collection: str = "4D-Lung") -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def _traffic(gw: GatewayServer, fake: FakeServer) -> str:
    """A miss and two hits of getSeries, a call that needs the service token, and a kept
    series download; returns the series."""
    for _ in range(3):
        assert httpx.get(f"{gw.url}{S}/v1/getSeries?Collection=4D-Lung", timeout=30).is_success
    assert httpx.get(f"{gw.url}{S}/v2/getCollectionValues", timeout=30).is_success
    uid = _series(fake)
    download = httpx.get(f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}", timeout=60)
    assert download.status_code == 200
    return uid


@contextmanager
def _download_under_way(gw: GatewayServer, fake: FakeServer, uid: str) -> Iterator[int]:
    """A series download that has started and goes on for a while (the fake sends a piece
    every few seconds); yields the bytes received so far."""
    fake.app.slow(seconds_between_chunks=3.0, path_contains="getImage")
    url = f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}"
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as answer:
        assert answer.status_code == 200
        chunks = answer.iter_raw()  # held: dropping the iterator would close the transfer
        yield len(next(chunks))


def _status(gw: GatewayServer, **kwargs: Any) -> dict[str, Any]:
    answer = httpx.get(gw.url + "/_proxy/status", timeout=30, **kwargs)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


@pytest.fixture
def gw(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> Iterator[GatewayServer]:
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url)) as server:
        yield server


# --- pure parts ------------------------------------------------------------------------------


def test_the_minute_ring_counts_each_minute_apart() -> None:
    ring = MinuteRing(minutes=3)
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 60  # a minute's start
    ring.sample(t0 + 5, 0, 0)
    ring.sample(t0 + 30, 7, 3)
    ring.sample(t0 + 65, 10, 4)  # the first minute closes with what was counted by then
    ring.sample(t0 + 185, 16, 4)  # no sample in the third minute: it shows nothing
    minutes = ring.minutes(t0 + 190, 20, 5)
    assert [(m.start - t0, m.requests, m.from_cache, m.partial) for m in minutes] == [
        (0, 10, 4, False),
        (60, 6, 0, False),
        (120, 0, 0, False),
        (180, 4, 1, True),
    ]
    later = ring.minutes(t0 + 245, 21, 5)  # a ring of three: the oldest minute leaves
    assert [(m.start - t0, m.requests, m.partial) for m in later] == [
        (60, 6, False),
        (120, 0, False),
        (180, 5, False),
        (240, 0, True),
    ]
    rates = rates_of(
        [MinuteTally(0, 60, 30), MinuteTally(60, 120, 90), MinuteTally(120, 5, 5, partial=True)]
    )
    assert rates.requests_per_second == 1.5  # 180 requests in two full minutes
    assert rates.from_cache_ratio == round(120 / 180, 4)


def test_a_downloads_series_is_read_from_its_query() -> None:
    assert named_series(b"SeriesInstanceUID=1.2.3&x=1") == "1.2.3"
    assert named_series(b"seriesuid=4.5") == "4.5"
    assert named_series(b"Collection=LIDC") == "-"
    assert named_series(b"%ff%fe=\xff") == "-"
    # Not UTF-8: shown with replacement characters (else the JSON and the page would fail).
    assert named_series(b"SeriesInstanceUID=1.2%ff") == "1.2\ufffd"
    assert named_series(b"SeriesInstanceUID=" + b"9" * 900) == "9" * 500


def _token(state: str = "valid", failure: str | None = None) -> TokenStatus:
    return TokenStatus(state, 3000.0, 1_800_003_000.0, 1, int(bool(failure)), failure, None)


def _upstream(circuit: str = "closed", error: str | None = None, **token: Any) -> UpstreamStatus:
    state = "ok" if circuit == "closed" else "unreachable"
    return UpstreamStatus(
        "nbia", "https://nbia.example/", "/", state, state == "ok", circuit, 0, 0, error,
        1_800_000_000.0 if error else None, _token(**token),
    )  # fmt: skip


def _cache(**changes: Any) -> CacheStatus:
    collection = CollectionFigures("4D-Lung", 2, 4096, 1, 17160, 3)
    values: dict[str, Any] = {
        "enabled": True,
        "available": True,
        "reason": None,
        "memory_bytes": 4096,
        "classes": [ClassFigures("metadata", 2, 4096), ClassFigures("binary", 1, 17160)],
        "endpoints": [],
        "largest_collections": [collection],
        "most_used_collections": [collection],
    }
    return CacheStatus(**(values | changes))


def test_alerts_name_what_to_act_on() -> None:
    quiet = alerts_for(False, [_upstream()], _cache(), [], 0)
    assert quiet == []
    full = Disk("binary_dir", "/srv/bin", 100 * 2**30, 2**30, nearly_full=True)
    found = alerts_for(
        True,
        [_upstream("open", "upstream nbia.example unreachable (connection refused)",
                   state="failing", failure="upstream nbia.example refused the service account "
                   "login (status 401)")],
        _cache(available=False, reason="database is locked"),
        [full],
        4,
    )  # fmt: skip
    text = "\n".join(f"{a.level}: {a.message}" for a in found)
    assert "critical: the disk of binary_dir (/srv/bin) is nearly full" in text
    assert "critical: upstream nbia is unreachable, its circuit open: upstream nbia.example" in text
    assert "critical: the service token of upstream nbia cannot be renewed: upstream" in text
    assert "critical: the cache is not in use: database is locked" in text
    assert "warning: 4 cache writes were skipped for low disk space" in text
    assert "warning: offline mode" in text


def _hostile_snapshot() -> Snapshot:
    bad_collection = CollectionFigures(HOSTILE, 1, 10, 0, 0, 1)
    return Snapshot(
        generated_at=1_800_000_100.0,
        version="0.1.0",
        pid=1,
        access="open",
        offline=False,
        refresh_seconds=10,
        alerts=[Alert("critical", f"upstream nbia is degraded: {HOSTILE}")],
        upstreams=[_upstream("open", HOSTILE, state="failing", failure=HOSTILE)],
        rates=Rates(True, None, [MinuteTally(1_800_000_040.0, 3, 1, True)], None, None),
        cache=_cache(
            endpoints=[],
            largest_collections=[bad_collection],
            most_used_collections=[bad_collection],
        ),
        downloads=[Download("client", HOSTILE, "127.0.0.1", "getImage", HOSTILE, 10, 1.0, 10.0)],
        errors=[LoggedError(1_800_000_000.0, "WARNING", "nbia_proxy.gateway", HOSTILE)],
        disks=[Disk("data_dir", f"/srv/{HOSTILE}", 100, 50, False)],
    )


def test_the_page_escapes_what_clients_and_upstreams_sent() -> None:
    page = render(_hostile_snapshot())
    assert (
        "<script" not in page
        and "<img" not in page
        and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    )
    escaped = html.escape(HOSTILE, quote=True)
    assert page.count(escaped) >= 7  # upstream error, token, alert, collections, download, log
    # Nothing from another host: no script, no stylesheet or image from elsewhere.
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert '<meta http-equiv="refresh" content="10">' in page


# --- against a gateway -----------------------------------------------------------------------


def test_status_json_after_some_traffic(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _traffic(gw, nbia_upstream)
    status = _status(gw)
    assert set(status) >= {"upstreams", "rates", "cache", "downloads", "errors", "alerts"}
    upstreams = {u["name"]: u for u in status["upstreams"]}
    nbia = upstreams["nbia"]
    assert (nbia["state"], nbia["reachable"], nbia["circuit"]) == ("ok", True, "closed")
    assert nbia["mount"] == "/" and upstreams["nlst"]["mount"] == "/nlst"
    token = nbia["token"]
    assert token["state"] == "valid" and token["renewals"] == 1
    assert token["expires_in_seconds"] > 0 and token["expires_at"] > status["generated_at"]
    assert upstreams["nlst"]["token"]["state"] == "none"  # never asked for one
    # Five requests so far (three getSeries, getCollectionValues, the download), two from the
    # cache; all in the minute under way or the one before it.
    minutes = status["rates"]["minutes"]
    assert status["rates"]["available"] and minutes[-1]["partial"]
    assert sum(m["requests"] for m in minutes) == 5
    assert sum(m["from_cache"] for m in minutes) == 2
    classes = {c["name"]: c for c in status["cache"]["classes"]}
    assert classes["metadata"]["entries"] >= 2 and classes["metadata"]["bytes"] > 0
    assert classes["binary"] == {
        "name": "binary",
        "entries": 1,
        "bytes": classes["binary"]["bytes"],
    }
    largest = {c["name"]: c for c in status["cache"]["largest_collections"]}
    # The kept download counts for 4D-Lung: the cached getSeries answer lists its series.
    assert largest["4D-Lung"]["entries"] == 1 and largest["4D-Lung"]["files"] == 1
    assert largest["4D-Lung"]["file_bytes"] == classes["binary"]["bytes"]
    assert status["cache"]["most_used_collections"][0]["name"] == "4D-Lung"
    endpoints = {e["endpoint"]: e for e in status["cache"]["endpoints"]}
    assert endpoints["v1/getSeries"]["hits"] == 2
    assert status["downloads"] == [] and status["alerts"] == []
    assert {d["name"] for d in status["disks"]} == {"data_dir", "binary_dir"}
    # Never a token, in the JSON or on the page.
    page = httpx.get(gw.url + "/_proxy/", timeout=30)
    assert nbia_upstream.app.issued_access_tokens
    for secret in nbia_upstream.app.issued_access_tokens | set(nbia_upstream.app.tokens.refresh):
        assert secret not in json.dumps(status) and secret not in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # none: default-src 'none'
    assert "4D-Lung" in page.text and uid not in page.text  # no download under way


def test_a_download_under_way_is_listed(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    with _download_under_way(gw, nbia_upstream, uid) as received:
        downloads = _status(gw)["downloads"]
    assert len(downloads) == 1, downloads
    download = downloads[0]
    assert (download["kind"], download["user"], download["client"]) == (
        "client", "anonymous", "127.0.0.1"
    )  # fmt: skip
    assert download["series"] == uid and download["endpoint"] == "getImage"
    assert download["bytes"] >= received > 0 and download["bytes_per_second"] > 0


def test_a_hostile_series_and_path_are_shown_escaped(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """A series UID and a path a client chose show as text: escaped on the page, as sent in
    the JSON."""
    nbia_upstream.app.slow(seconds_before_headers=2.0, path_contains="getImage")
    params = {"SeriesInstanceUID": HOSTILE}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.get, f"{gw.url}{S}/v4/getImage", params=params, timeout=60)
        while not nbia_upstream.app.requests_to("/v4/getImage"):  # it waits for its head now
            threading.Event().wait(0.02)
        downloads = _status(gw)["downloads"]
        page = httpx.get(gw.url + "/_proxy/", timeout=30).text
        assert pending.result().status_code == 400  # the fake knows no such series
    assert [d["series"] for d in downloads] == [HOSTILE]
    nbia_upstream.stop()
    assert httpx.get(f"{gw.url}{S}/v1/{HOSTILE}", timeout=30).status_code == 502
    errors = _status(gw)["errors"]
    assert any(f"GET {S}/v1/{HOSTILE} -> 502" in e["message"] for e in errors), errors
    after = httpx.get(gw.url + "/_proxy/", timeout=30).text
    escaped = html.escape(HOSTILE, quote=True)
    for shown in (page, after):
        assert "<script" not in shown and "<img" not in shown and escaped in shown


def test_an_open_circuit_and_offline_mode_are_warned(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    settings = make_settings(
        tmp_path, nbia_upstream.url, nlst_upstream.url, circuit_failure_threshold=1
    )
    with GatewayServer(settings) as gw:
        nbia_upstream.stop()
        assert httpx.get(f"{gw.url}{S}/v1/getCollectionValues", timeout=30).status_code == 502
        status = _status(gw)
    nbia = next(u for u in status["upstreams"] if u["name"] == "nbia")
    assert (nbia["state"], nbia["reachable"]) == ("unreachable", False)
    assert nbia["circuit"] in ("open", "half-open") and nbia["last_error"]
    assert nbia["last_error_at"] <= status["generated_at"]
    assert any("upstream nbia is unreachable" in a["message"] for a in status["alerts"])
    offline = make_settings(tmp_path / "off", nbia_upstream.url, nlst_upstream.url, offline=True)
    with GatewayServer(offline) as gw:
        alerts = _status(gw)["alerts"]
    assert [a["message"][:12] for a in alerts] == ["offline mode"]


def test_the_status_page_needs_an_admin_in_accounts_mode(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    url = database_url(None, tmp_path)
    migrate(url)
    engine = make_engine(url)
    registry = Registry(engine)
    keys = {"root": registry.add("root", admin=True), "alice": registry.add("alice")}
    engine.dispose()
    settings = make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url, access="accounts")
    with GatewayServer(settings) as gw:
        for path in ("/_proxy/", "/_proxy/status", "/docs"):
            assert httpx.get(gw.url + path, timeout=30).status_code == 401
            alice = {"Authorization": f"Bearer {keys['alice']}"}
            refused = httpx.get(gw.url + path, headers=alice, timeout=30)
            assert refused.status_code == 403 and refused.json()["error"]
            root = {"Authorization": f"Bearer {keys['root']}"}
            assert httpx.get(gw.url + path, headers=root, timeout=30).status_code == 200
        status = _status(gw, headers=root)
    assert status["access"] == "accounts"
    assert keys["root"] not in json.dumps(status)


def test_the_status_page_in_a_browser(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    """Chromium (no JavaScript needed, no host but the loopback one) shows the upstreams, the
    cache figures and the download under way; the screenshot is left in test-artifacts/."""
    _traffic(gw, nbia_upstream)
    other = next(s.uid for s in nbia_upstream.app.dataset.series if s.uid != _series(nbia_upstream))
    with chromium() as browser, _download_under_way(gw, nbia_upstream, other):
        browser.get(gw.url + "/_proxy/")
        upstreams = browser.find_element(
            By.XPATH, "//h2[@id='upstreams']/following-sibling::table[1]"
        )
        cache = browser.find_element(By.XPATH, "//h2[@id='cache']/following-sibling::table[1]")
        downloads = browser.find_element(
            By.XPATH, "//h2[@id='downloads']/following-sibling::table[1]"
        )
        upstream_rows = [r.text for r in upstreams.find_elements(By.TAG_NAME, "tr")]
        cache_text, downloads_text = cache.text, downloads.text
        page_text = browser.find_element(By.TAG_NAME, "body").text
        scripts = browser.find_elements(By.TAG_NAME, "script")
        refresh = browser.find_element(By.CSS_SELECTOR, "meta[http-equiv=refresh]")
        refresh_seconds = refresh.get_attribute("content")
        screenshot(browser, "status-page")
        urls = requested_urls(browser)
    assert any(row.startswith("nbia") and " ok " in f" {row} " for row in upstream_rows)
    assert any("valid, expires" in row for row in upstream_rows), upstream_rows
    assert "metadata" in cache_text and "binary" in cache_text
    assert "4D-Lung" in page_text and "Largest collections" in page_text
    assert other in downloads_text and "anonymous" in downloads_text
    assert scripts == [] and refresh_seconds == "10"
    assert off_the_machine(urls) == [] and urls[0] == gw.url + "/_proxy/"  # (and its favicon)


def _token_for(handler: Any, clock: list[float]) -> ServiceToken:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ServiceToken(
        client=client,
        token_url="https://nbia.example/nbia-api/oauth/token",
        upstream="nbia",
        username="svc",
        password=SecretStr("svc-pw-Zq81"),
        client_id="nbia",
        refresh_margin_seconds=60,
        clock=lambda: clock[0],
    )


def test_the_service_token_says_its_state_and_expiry_never_the_token() -> None:
    clock = [1000.0]
    answers = [httpx.Response(200, json={"access_token": "tok-Secret1", "expires_in": 300})]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else httpx.Response(401, json={"error": "no"})

    token = _token_for(handler, clock)
    assert (token.state(), token.expires_in()) == ("none", None)
    asyncio.run(token.get())
    assert (token.state(), token.expires_in()) == ("valid", 300)
    clock[0] += 250  # within the refresh margin
    assert token.state() == "renewing"
    clock[0] += 100
    assert token.state() == "expired" and token.expires_in() == -50
    with pytest.raises(ServiceTokenError):
        asyncio.run(token.get())  # the login is refused now
    assert token.state() == "failing" and token.last_failure_at is not None
    assert token.last_failure == (
        "upstream nbia.example refused the service account login (status 401)"
    )
    status = upstream_status(SimpleNamespace(  # type: ignore[arg-type]
        name="nbia", base_url=httpx.URL("https://nbia.example/"), config=SimpleNamespace(mount=""),
        breaker=SimpleNamespace(is_open=False, unreachable=False, state="closed", failures=0,
                                last_failure=None, last_failure_at=None),
        limiter=SimpleNamespace(waiting=0), token=token,
    ), now=5000.0)  # fmt: skip
    assert status.token.state == "failing" and status.token.expires_in_seconds == -50
    shown = json.dumps(asdict(status)) + render(replace(_hostile_snapshot(), upstreams=[status]))
    assert "tok-Secret1" not in shown and "svc-pw-Zq81" not in shown


def test_the_cache_figures_are_read_again_only_once_they_are_old() -> None:
    """A page left open reloads every 10 s: the scan of the cache tables is reused for 15 s
    (and never while the cache is unavailable, nor an unavailable reading)."""
    board = StatusBoard()
    reads: list[float] = []
    available = [True]

    async def read(cache: Any, binaries: Any, now: float) -> CacheStatus:
        reads.append(now)
        return _cache(available=available[0], reason=None if available[0] else "down")

    board._cache_status = read  # type: ignore[method-assign]
    cache = SimpleNamespace(unavailable=None)

    def at(now: float) -> CacheStatus:
        return asyncio.run(board._recent_cache_status(cache, None, now))  # type: ignore[arg-type]

    at(1000.0)
    at(1000.0 + CACHE_FIGURES_SECONDS - 1)
    assert reads == [1000.0]
    at(1000.0 + CACHE_FIGURES_SECONDS)
    assert reads == [1000.0, 1000.0 + CACHE_FIGURES_SECONDS]
    available[0] = False
    at(2000.0)
    at(2001.0)  # an unavailable reading is not kept
    assert reads[-2:] == [2000.0, 2001.0]


def test_pages_asked_for_together_share_one_reading_of_the_cache_figures() -> None:
    """A burst of page loads as the figures age (or with the database failing, when no
    reading is kept) scans the cache tables once, not once per page."""
    board = StatusBoard()
    reads: list[float] = []

    async def read(cache: Any, binaries: Any, now: float) -> CacheStatus:
        reads.append(now)
        await asyncio.sleep(0.05)  # the scan takes a while: the other pages arrive meanwhile
        return _cache(available=False, reason="down")

    board._cache_status = read  # type: ignore[method-assign]
    cache = SimpleNamespace(unavailable=None)

    async def burst() -> list[CacheStatus]:
        pages = [board._recent_cache_status(cache, None, 1000.0) for _ in range(50)]  # type: ignore[arg-type]
        return await asyncio.gather(*pages)

    found = asyncio.run(burst())
    assert len(reads) == 1 and all(f.reason == "down" for f in found)
    asyncio.run(burst())  # the next burst reads again (a failed reading is not kept)
    assert len(reads) == 2


def test_thousands_of_downloads_list_the_longest_running_and_count_the_rest() -> None:
    many = [
        Download("client", f"u{i}", "127.0.0.1", "getImage", f"1.{i}", 1000, float(i), 1.0)
        for i in range(5000)
    ]
    shown, more = shown_downloads(many)
    assert len(shown) == DOWNLOADS_SHOWN and more == 5000 - DOWNLOADS_SHOWN
    assert shown[0].seconds == 4999 and shown[-1].seconds == 5000 - DOWNLOADS_SHOWN
    page = render(replace(_hostile_snapshot(), downloads=shown, downloads_not_shown=more))
    assert page.count("<code>1.") == DOWNLOADS_SHOWN and f"and {more} more" in page
    assert shown_downloads(many[:3]) == (sorted(many[:3], key=lambda d: -d.seconds), 0)

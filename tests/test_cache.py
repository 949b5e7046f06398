"""The metadata cache, end to end over real sockets, on SQLite and on PostgreSQL.

Time is an injected clock (no sleeping). ``writer.flush()`` waits for the writer thread, so the
database state is settled before a test looks at it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from tcia_utils import nbia

from proxy.cli import main as cli_main
from proxy.tcia import gateway_url_builder
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.gateway_server import Clock, GatewayFactory, GatewayServer, request_line, send_raw

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
HOUR = 3600.0


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture
def make_gateway(make_gateway: GatewayFactory, db_url: str, clock: Clock) -> GatewayFactory:
    """Build gateways on this test's database; all share the clock and the upstreams."""
    return functools.partial(make_gateway, database_url=db_url, cache_clock=clock)


def get(server: GatewayServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url + path, timeout=30, **kwargs)


def post(server: GatewayServer, path: str, body: str, **kwargs: Any) -> httpx.Response:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return httpx.post(server.url + path, content=body, headers=headers, timeout=30, **kwargs)


def upstream_count(fake: FakeServer, suffix: str) -> int:
    return len(fake.app.requests_to(suffix))


def flush(server: GatewayServer) -> None:
    assert server.app.cache is not None
    server.app.cache.writer.flush()


def stats(server: GatewayServer) -> dict[str, Any]:
    flush(server)
    response = get(server, "/_proxy/cache/stats")
    assert response.status_code == 200
    return dict(response.json())


# --- hits, misses, TTLs --------------------------------------------------------------------


def test_second_identical_get_is_a_hit(
    gw: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    first = get(gw, SERIES)
    clock.advance(42)
    second = get(gw, SERIES)
    assert (first.headers["x-cache"], first.headers["age"]) == ("MISS", "0")
    assert (second.headers["x-cache"], second.headers["age"]) == ("HIT", "42")
    assert second.content == first.content and second.status_code == 200
    assert second.headers["content-type"] == first.headers["content-type"]
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 1


def test_entries_expire_after_their_endpoint_ttl(
    gw: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    """Series metadata lives a day; the collection list (a value list) six hours."""
    get(gw, SERIES)
    get(gw, f"{S}/v4/getCollectionValues")
    clock.advance(6 * HOUR + 1)
    assert get(gw, SERIES).headers["x-cache"] == "HIT"
    assert get(gw, f"{S}/v4/getCollectionValues").headers["x-cache"] == "MISS"
    clock.advance(18 * HOUR)
    assert get(gw, SERIES).headers["x-cache"] == "MISS"
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 2


def test_ttl_patterns_from_settings_come_first(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, clock: Clock
) -> None:
    with make_gateway(cache_ttl={"v4/getSeries*": 10}) as server:
        get(server, SERIES)
        clock.advance(9)
        assert get(server, SERIES).headers["x-cache"] == "HIT"
        clock.advance(2)
        assert get(server, SERIES).headers["x-cache"] == "MISS"


def test_client_no_cache_refreshes_the_entry(
    gw: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    get(gw, SERIES)
    clock.advance(100)
    forced = get(gw, SERIES, headers={"Cache-Control": "no-cache"})
    assert forced.headers["x-cache"] == "MISS"
    again = get(gw, SERIES)
    assert (again.headers["x-cache"], again.headers["age"]) == ("HIT", "0")
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 2


# --- keys ------------------------------------------------------------------------------------


def test_query_order_and_percent_encoding_do_not_matter(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    get(gw, f"{S}/v4/getSeries?Collection=4D-Lung&Modality=CT")
    assert get(gw, f"{S}/v4/getSeries?Modality=CT&Collection=4D-Lung").headers["x-cache"] == "HIT"
    assert get(gw, f"{S}/v4/getSeries?Modality=CT&Collection=4D%2DLung").headers["x-cache"] == (
        "HIT"
    )
    assert get(gw, f"{S}/v4/getSeries?Modality=MR&Collection=4D-Lung").headers["x-cache"] == (
        "MISS"
    )
    # The upstream still got the client's own bytes, in the client's order.
    assert [r.query for r in nbia_upstream.app.requests_to("/v4/getSeries")] == [
        "Collection=4D-Lung&Modality=CT",
        "Modality=MR&Collection=4D-Lung",
    ]


def test_form_field_order_does_not_matter_but_repeated_values_keep_theirs(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uids = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"]
    a, b = uids[0], uids[1]
    path = f"{S}/v4/getSeriesMetadata"
    assert post(gw, path, f"list={a}&format=csv").headers["x-cache"] == "MISS"
    assert post(gw, path, f"format=csv&list={a}").headers["x-cache"] == "HIT"
    assert post(gw, path, f"list={a}&list={b}").headers["x-cache"] == "MISS"
    assert post(gw, path, f"list={a}&list={b}").headers["x-cache"] == "HIT"
    assert post(gw, path, f"list={b}&list={a}").headers["x-cache"] == "MISS"
    assert upstream_count(nbia_upstream, "/v4/getSeriesMetadata") == 3


def test_service_account_identity_separates_views(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """Root endpoints answer per account: a new account never gets the old one's entries."""
    nbia_upstream.app.users = {"nbia_guest": "", "lab-a": "pa", "lab-b": "pb"}
    root = f"{S}/getCollectionValuesAndCounts"
    with make_gateway(username="lab-a", password="pa") as server:
        assert get(server, root).headers["x-cache"] == "MISS"
        assert get(server, root).headers["x-cache"] == "HIT"
        assert get(server, SERIES).headers["x-cache"] == "MISS"
    with make_gateway(username="lab-b", password="pb") as server:
        assert get(server, root).headers["x-cache"] == "MISS"
        assert get(server, SERIES).headers["x-cache"] == "HIT"  # anonymous v4: shared
    with make_gateway(username="lab-b", password="pb", token_on_v4=True) as server:
        assert get(server, SERIES).headers["x-cache"] == "MISS"  # now lab-b's own view
    users = [r.user for r in nbia_upstream.app.requests_to("/getCollectionValuesAndCounts")]
    assert users == ["lab-a", "lab-b"]


# --- what is never cached ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429, 401, 403])
def test_error_answers_are_not_stored(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, status: int
) -> None:
    # No retries here: the point is what reaches the client and what is stored.
    with make_gateway(retry_max_attempts=0) as gw:
        nbia_upstream.app.fail_next(1, status=status, path_contains="getSeries")
        assert get(gw, SERIES).status_code == status
        good = get(gw, SERIES)
        assert (good.status_code, good.headers["x-cache"]) == (200, "MISS")
        assert get(gw, SERIES).headers["x-cache"] == "HIT"


def test_deterministic_400_is_remembered_briefly(
    gw: GatewayServer, nbia_upstream: FakeServer, clock: Clock
) -> None:
    strict = f"{S}/v4/getSeries?Collection=4D-Lung&foo=bar"
    first = get(gw, strict)
    assert first.status_code == 400
    assert get(gw, strict).headers["x-cache"] == "HIT"
    clock.advance(61)
    assert get(gw, strict).headers["x-cache"] == "MISS"
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 2


def test_empty_body_200_is_a_cacheable_answer(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    empty = f"{S}/v4/getSeries?Collection=CPTAC-SAR"
    get(gw, empty)
    hit = get(gw, empty)
    assert (hit.status_code, hit.content, hit.headers["x-cache"]) == (200, b"", "HIT")


def test_side_effects_and_tokens_bypass_the_cache_binaries_are_kept_apart(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    fake = nbia_upstream.app
    uid = next(s.uid for s in fake.dataset.series if s.collection == "4D-Lung")
    for name in ("list-one", "list-two"):
        made = post(gw, f"{S}/createSharedList", f"list={uid}&name={name}")
        assert (made.status_code, made.headers["x-cache"]) == (200, "BYPASS")
    zip_path = f"{S}/v4/getImage?SeriesInstanceUID={uid}"
    # Kept by the series cache (tests/test_series_cache.py), not in the metadata cache.
    assert [get(gw, zip_path).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]
    assert upstream_count(nbia_upstream, "/v4/getImage") == 1
    login = "username=a&password=b&grant_type=password"
    tokens = {post(gw, "/nbia-api/oauth/token", login).json()["access_token"] for _ in range(2)}
    assert len(tokens) == 2
    # The one entry is the zip's getSeriesSize, which the series cache checks the zip against.
    assert stats(gw)["entries"] == 1
    assert upstream_count(nbia_upstream, "/v4/getSeriesSize") == 1


# --- storage ---------------------------------------------------------------------------------


def test_entries_survive_a_restart(make_gateway: GatewayFactory, nbia_upstream: FakeServer) -> None:
    with make_gateway() as server:
        first = get(server, SERIES)
    nbia_upstream.stop()  # the second gateway cannot ask the upstream
    with make_gateway() as server:
        again = get(server, SERIES)
    assert (again.status_code, again.headers["x-cache"]) == (200, "HIT")
    assert again.content == first.content


def test_size_cap_evicts_least_recently_used(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, clock: Clock
) -> None:
    paths = [f"{S}/v4/getSeries?Collection=C{i:03d}" for i in range(40)]  # empty answers
    with make_gateway(cache_max_bytes=4000, cache_memory_bytes=0) as server:
        get(server, paths[0])
        for path in paths[1:]:
            clock.advance(1)
            get(server, path)
            clock.advance(1)
            get(server, paths[0])  # keep the first one in use
        current = stats(server)
        assert 0 < current["bytes"] <= 4000
        assert current["entries"] < len(paths)
        assert get(server, paths[0]).headers["x-cache"] == "HIT"
        assert get(server, paths[1]).headers["x-cache"] == "MISS"  # the oldest went first


def test_sweep_deletes_long_expired_entries(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, clock: Clock
) -> None:
    with make_gateway(cache_keep_expired_seconds=HOUR) as server:
        get(server, SERIES)
        get(server, f"{S}/v4/getCollectionValues")
        assert stats(server)["entries"] == 2
        clock.advance(6 * HOUR + 2 * HOUR)  # the value list expired 2 h ago, series not yet
        assert stats(server)["entries"] == 1


def test_200_concurrent_distinct_misses_are_all_stored(
    gw: GatewayServer, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    paths = [f"{S}/v4/getSeries?Collection=Load{i:03d}" for i in range(200)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda p: get(gw, p), paths))
    failed = [(a.status_code, a.text) for a in answers if a.status_code != 200]
    assert failed == []
    assert stats(gw)["entries"] == 200
    assert gw.app.cache is not None and gw.app.cache.writer.errors == 0
    assert "locked" not in caplog.text
    with ThreadPoolExecutor(max_workers=50) as pool:
        again = list(pool.map(lambda p: get(gw, p).headers["x-cache"], paths))
    assert again == ["HIT"] * 200


# --- control ---------------------------------------------------------------------------------


def test_stats_count_entries_bytes_hits_and_misses_per_endpoint(gw: GatewayServer) -> None:
    get(gw, SERIES)
    get(gw, SERIES)
    get(gw, SERIES)
    get(gw, f"{S}/v4/getCollectionValues")
    current = stats(gw)
    series = current["endpoints"]["v4/getSeries"]
    assert (series["entries"], series["hits"], series["misses"]) == (1, 2, 1)
    assert series["hit_ratio"] == round(2 / 3, 4)
    assert series["bytes"] > len(get(gw, SERIES).content)
    assert (current["entries"], current["hits"], current["misses"]) == (2, 2, 2)


def test_purge_by_collection_reaches_simple_searches_naming_it(gw: GatewayServer) -> None:
    """A simple search names its collection as criteriaType<i>=CollectionCriteria, value<i>."""

    def search(collection: str) -> httpx.Response:
        form = (
            f"criteriaType0=ImageModalityCriteria&value0=CT&criteriaType1=CollectionCriteria"
            f"&value1={collection}&sortField=subject&sortDirection=ascending&start=0&size=10"
        )
        return post(gw, f"{S}/v4/getSimpleSearch", form)

    assert search("4D-Lung").headers["x-cache"] == "MISS"
    assert search("TCGA-KIRC").headers["x-cache"] == "MISS"
    flush(gw)
    purged = httpx.delete(gw.url + "/_proxy/cache", params={"collection": "4D-Lung"})
    assert purged.json()["purged_entries"] == 1
    assert search("4D-Lung").headers["x-cache"] == "MISS"
    assert search("TCGA-KIRC").headers["x-cache"] == "HIT"


def test_purge_over_http_by_pattern_collection_and_series(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = next(s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung")
    get(gw, SERIES)
    get(gw, f"{S}/v4/getSeries?Collection=4D-Lung")
    get(gw, f"{S}/v4/getSeriesSize?SeriesInstanceUID={uid}")
    get(gw, f"{S}/v4/getCollectionValues")
    flush(gw)

    def purge(**params: str) -> int:
        response = httpx.delete(gw.url + "/_proxy/cache", params=params)
        assert response.status_code == 200
        return int(response.json()["purged_entries"])

    assert purge(series=uid) == 1
    assert purge(collection="TCGA-KIRC") == 1
    assert purge(path="v4/getCollection*") == 1
    assert get(gw, SERIES).headers["x-cache"] == "MISS"
    assert get(gw, f"{S}/v4/getSeries?Collection=4D-Lung").headers["x-cache"] == "HIT"
    assert purge() == 2
    assert stats(gw)["entries"] == 0


def test_cli_stats_and_purge_work_on_the_same_database(
    make_gateway: GatewayFactory, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with make_gateway() as server:
        get(server, SERIES)
        get(server, SERIES)
        flush(server)
    assert cli_main(["cache", "stats", "--database-url", db_url]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["endpoints"]["v4/getSeries"]["hits"] == 1
    assert cli_main(["cache", "purge", "--collection", "TCGA-KIRC", "--database-url", db_url]) == 0
    assert json.loads(capsys.readouterr().out)["purged_entries"] == 1


def test_tcia_utils_second_identical_call_never_reaches_the_upstream(
    monkeypatch: pytest.MonkeyPatch, gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gw.url))
    uids = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"][:2]
    first = (nbia.getSeries(collection="4D-Lung"), nbia.getSeriesList(uids))
    second = (nbia.getSeries(collection="4D-Lung"), nbia.getSeriesList(uids))
    assert first[0] == second[0]
    assert first[1] is not None and second[1] is not None and first[1].equals(second[1])
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 1
    assert upstream_count(nbia_upstream, "/v4/getSeriesMetadata") == 1


# --- the protocol shortcut -------------------------------------------------------------------


def test_hits_take_the_protocol_shortcut_and_match_the_asgi_path(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """A plain keep-alive GET hit skips ASGI; any other form still hits, the long way round."""
    miss = get(gw, SERIES)
    short = get(gw, SERIES)
    assert gw.app.shortcut_hits == 1
    encoded = get(gw, SERIES.replace("getSeries", "get%53eries"))  # decoded by uvicorn: ASGI
    assert gw.app.shortcut_hits == 1
    _, head, body = send_raw(gw.url, request_line("GET", SERIES, version="1.0"))
    assert gw.app.shortcut_hits == 1
    for answer in (short, encoded):
        assert (answer.status_code, answer.headers["x-cache"]) == (200, "HIT")
        assert answer.content == miss.content
        assert answer.headers["content-type"] == miss.headers["content-type"]
        assert answer.headers["content-length"] == str(len(miss.content))
    assert b"x-cache: HIT" in head and body == miss.content
    assert upstream_count(nbia_upstream, "/v4/getSeries") == 1


def test_shortcut_keeps_the_connection_usable(gw: GatewayServer) -> None:
    """Many hits and a miss on one keep-alive connection, in order, all complete."""
    get(gw, SERIES)
    with httpx.Client(base_url=gw.url, timeout=10) as client:
        answers = [client.get(SERIES) for _ in range(50)]
        other = client.get(f"{S}/v4/getCollectionValues")
        answers.append(client.get(SERIES))
    assert [a.headers["x-cache"] for a in answers] == ["HIT"] * 51
    assert other.headers["x-cache"] == "MISS" and other.json()
    assert gw.app.shortcut_hits == 51

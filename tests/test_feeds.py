"""Following NBIA's update feeds: the pure policy, the poll against the fake, its position, its
lock and its back-off."""

from __future__ import annotations

import datetime as dt
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import proxy.feeds.poller
from proxy.db import make_engine, migrate
from proxy.feeds.ledger import Ledger
from proxy.feeds.plan import (
    backoff_seconds,
    feed_date,
    next_poll_at,
    purge_plan,
    window_start,
)
from proxy.feeds.poller import FeedError, forced_wait
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.fake_nbia.dataset import Series
from tests.gateway_server import GatewayServer, cache_stats, make_settings

DAY = 86400.0
NOON = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()


# --- the pure policy ------------------------------------------------------------------------


def test_the_window_reaches_back_to_the_day_before_the_last_success() -> None:
    assert window_start(NOON, None, NOON + 3600) == dt.date(2026, 11, 30)
    # Successive windows overlap by a day: the feed compares release days.
    first = window_start(NOON - DAY, None, NOON)
    second = window_start(NOON, None, NOON + DAY)
    assert first == dt.date(2026, 11, 29) and second == dt.date(2026, 11, 30)
    assert second <= dt.date(2026, 12, 1) - dt.timedelta(days=1)


def test_the_first_window_starts_the_day_before_the_oldest_cached_answer() -> None:
    assert window_start(None, NOON - 10 * DAY, NOON) == dt.date(2026, 11, 20)
    assert window_start(None, None, NOON) == dt.date(2026, 11, 30)  # empty cache
    assert window_start(NOON + DAY, None, NOON) == dt.date(2026, 11, 30)  # a clock gone back


def test_feed_dates_differ_by_version() -> None:
    day = dt.date(2026, 3, 7)
    assert feed_date(day, "v2") == "07/03/2026"
    assert feed_date(day, "v4") == "03-07-2026"


def test_failures_back_off_exponentially_up_to_a_cap() -> None:
    assert [backoff_seconds(n, 3600) for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff_seconds(20, 3600) == 3600
    assert backoff_seconds(20, 100) == 100  # never longer than the interval
    assert backoff_seconds(200, 1e9) == 3600  # nor than an hour


def test_the_next_poll_follows_the_shared_position() -> None:
    assert next_poll_at(None, None, 0, 3600) == float("-inf")
    assert next_poll_at(NOON, NOON, 0, 3600) == NOON + 3600
    assert next_poll_at(NOON, NOON + 10, 2, 3600) == NOON + 10 + 60


def _row(uid: str, **extra: object) -> dict[str, object]:
    return {
        "SeriesInstanceUID": uid,
        "StudyInstanceUID": f"st-{uid}",
        "PatientID": f"p-{uid}",
        "Collection": "C",
        "DateReleased": "12-01-2026",
        **extra,
    }


def test_a_new_series_purges_its_series_study_patient_and_collection() -> None:
    plan = purge_plan([_row("1")], {}, {})
    assert plan.tags == {
        ("series", "1"),
        ("study", "st-1"),
        ("patient", "p-1"),
        ("collection", "C"),
    }
    assert plan.series == {"1"}
    assert (plan.changed, plan.repeated) == (1, 0)


def test_repeats_from_an_overlapping_window_purge_nothing() -> None:
    first = purge_plan([_row("1"), _row("1")], {}, {})  # twice in one answer too
    assert first.changed == 1
    again = purge_plan([_row("1")], {}, first.seen)
    assert again.tags == frozenset() and again.series == frozenset()
    assert (again.changed, again.repeated) == (0, 1)
    assert again.seen == first.seen  # remembered for the poll after
    # The same series released again, or with other figures, is a change.
    changed = purge_plan([_row("1", ImageCount=3)], {}, again.seen)
    assert changed.series == {"1"}


def test_collection_news_purge_the_collection_lists_once() -> None:
    news = {"C": [{"PatientId": "p9", "Collection": "C"}], "D": []}
    plan = purge_plan([], news, {})
    assert plan.tags == {("collection", "C"), ("patient", "p9")}
    assert plan.series == frozenset()
    assert purge_plan([], news, plan.seen).tags == frozenset()
    assert "collection:D" not in plan.seen  # nothing new there


def test_a_forced_poll_waits_the_minimum_after_any_attempt() -> None:
    assert forced_wait(None, 60, NOON) == 0  # never polled
    assert forced_wait(NOON, 60, NOON + 10) == 50
    assert forced_wait(NOON, 60, NOON + 60) == 0
    assert forced_wait(NOON, 0, NOON) == 0  # no minimum
    assert forced_wait(NOON + DAY, 60, NOON) == 60  # a clock gone back: no longer than that


def test_a_gzipped_feed_is_unpacked_within_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = b'[{"SeriesInstanceUID": "1.2"}]'
    assert proxy.feeds.poller._rows(gzip.compress(rows), "gzip", "feed") == [
        {"SeriesInstanceUID": "1.2"}
    ]
    two_members = gzip.compress(rows[:10]) + gzip.compress(rows[10:])
    assert len(proxy.feeds.poller._rows(two_members, "gzip", "feed")) == 1
    monkeypatch.setattr(proxy.feeds.poller, "FEED_MAX_BYTES", 1024 * 1024)
    # A few kilobytes that unpack to 64 MiB: refused as the limit passes, not held in memory.
    bomb = gzip.compress(b"[" + b" " * (64 * 1024 * 1024) + b"]")
    assert len(bomb) < 1024 * 1024
    with pytest.raises(FeedError, match="once unpacked"):
        proxy.feeds.poller._rows(bomb, "gzip", "feed")
    with pytest.raises(FeedError, match="other than JSON"):
        proxy.feeds.poller._rows(gzip.compress(rows)[:-12], "gzip", "feed")  # cut short
    with pytest.raises(FeedError, match="other than JSON"):
        proxy.feeds.poller._rows(b"\x1f\x8bnot gzip", "gzip", "feed")


# --- the lock ---------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        migrate(url)
        yield url


def test_only_one_process_holds_the_polling_lock(migrated: str) -> None:
    engines = [make_engine(migrated), make_engine(migrated)]
    try:
        first, second = Ledger(engines[0]), Ledger(engines[1])
        lease = first.acquire("nbia")
        assert lease is not None
        assert second.acquire("nbia") is None
        other = second.acquire("nlst")  # each upstream has its own
        assert other is not None
        other.release()
        lease.release()
        again = second.acquire("nbia")
        assert again is not None
        again.release()
    finally:
        for engine in engines:
            engine.dispose()


def test_the_position_is_kept_in_the_database(migrated: str) -> None:
    engine = make_engine(migrated)
    try:
        ledger = Ledger(engine)
        assert ledger.read("nbia").last_success is None
        ledger.failed("nbia", NOON, "v2/getUpdatedSeries answered 500")
        ledger.failed("nbia", NOON + 30, "again")
        assert (ledger.read("nbia").failures, ledger.read("nbia").last_error) == (2, "again")
        ledger.succeeded("nbia", NOON + 90, {"series:1": "x"}, "v4")
        position = Ledger(make_engine(migrated)).read("nbia")
        assert (position.last_success, position.failures, position.form) == (NOON + 90, 0, "v4")
        assert position.seen == {"series:1": "x"}
    finally:
        engine.dispose()


# --- against the fake -------------------------------------------------------------------------


def _series(fake: FakeServer, collection: str) -> Series:
    return next(s for s in fake.app.dataset.series if s.collection == collection and not s.big)


def test_the_fakes_feeds_compare_release_days_as_nbia_does(nbia_upstream: FakeServer) -> None:
    series = _series(nbia_upstream, "4D-Lung")
    day = dt.date(2026, 6, 15)
    nbia_upstream.app.mark_updated(series.uid, released=day, description="NEW")
    base = f"{nbia_upstream.url}/nbia-api/services"

    def uids(path: str, **params: str) -> set[str]:
        answer = httpx.get(f"{base}/{path}", params=params)
        assert answer.status_code == 200, answer.text
        rows = answer.json() if answer.content else []  # NBIA's "none" is an empty body
        return {row.get("SeriesInstanceUID") or row.get("PatientId") for row in rows}

    # getUpdatedSeries: released after fromDate (">"), v4 and v2 dates differ.
    assert series.uid in uids("v4/getUpdatedSeries", fromDate="06-14-2026")
    assert series.uid not in uids("v4/getUpdatedSeries", fromDate="06-15-2026")
    token = httpx.post(
        f"{nbia_upstream.url}/nbia-api/oauth/token",
        data={"username": "nbia_guest", "password": "", "grant_type": "password"},
    ).json()["access_token"]
    answer = httpx.get(
        f"{base}/v2/getUpdatedSeries",
        params={"fromDate": "14/06/2026"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert [row["SeriesInstanceUID"] for row in answer.json()] == [series.uid]
    # The patient and study feeds: on or after fromDate (">=").
    assert uids("v4/NewPatientsInCollection", Collection="4D-Lung", fromDate="06-15-2026") == {
        series.patient_id
    }
    studies = httpx.get(
        f"{base}/v4/NewStudiesInPatientCollection",
        params={"Collection": "4D-Lung", "fromDate": "06-15-2026"},
    ).json()
    assert [row["StudyInstanceUID"] for row in studies] == [series.study_uid]
    # v1: Date, yyyy/MM/dd, required.
    assert uids("v1/NewPatientsInCollection", Collection="4D-Lung", Date="2026/06/14") == {
        series.patient_id
    }
    missing = httpx.get(f"{base}/v1/NewPatientsInCollection", params={"Collection": "4D-Lung"})
    assert missing.status_code == 400
    nbia_upstream.app.reset()
    assert series.uid not in uids("v4/getUpdatedSeries", fromDate="06-14-2026")


def _get(gateway: GatewayServer, path: str) -> httpx.Response:
    answer = httpx.get(f"{gateway.url}/nbia-api/services/{path}", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer


def _get_series(gateway: GatewayServer, series: Series) -> httpx.Response:
    """getSeries of that one series, through the gateway."""
    return _get(gateway, f"v4/getSeries?SeriesInstanceUID={series.uid}")


def _cached_then_updated(gateway: GatewayServer, fake: FakeServer) -> Series:
    """A 4D-Lung series whose getSeries the gateway has cached, then changed upstream."""
    series = _series(fake, "4D-Lung")
    _get_series(gateway, series)
    fake.app.mark_updated(series.uid, description="NEW")
    return series


def _poll(gateway: GatewayServer, upstream: str = "nbia") -> dict[str, Any]:
    answer = httpx.post(f"{gateway.url}/_proxy/feeds/poll?upstream={upstream}", timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()["upstreams"][upstream]
    return result


def _feeds(gateway: GatewayServer, upstream: str = "nbia") -> dict[str, Any]:
    shown: dict[str, Any] = cache_stats(gateway, "feeds")["upstreams"][upstream]
    return shown


@pytest.fixture
def no_background_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests poll through the control endpoint: the loop's first round waits for ever."""
    monkeypatch.setattr(proxy.feeds.poller, "FIRST_POLL_SECONDS", 1e9)


def _settings(data_dir: Path, fake: FakeServer, **extra: Any) -> Any:
    return make_settings(data_dir, fake.url, update_poll_seconds=3600, **extra)


def test_a_changed_series_is_fresh_after_one_poll_and_nothing_else_is_purged(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    changed, other = _series(nbia_upstream, "4D-Lung"), _series(nbia_upstream, "TCGA-KIRC")
    sibling = next(
        s
        for s in nbia_upstream.app.dataset.series
        if s.collection == "4D-Lung" and s.study_uid != changed.study_uid and not s.big
    )
    paths = {
        "series": f"v4/getSeries?SeriesInstanceUID={changed.uid}",
        "collection series": "v4/getSeries?Collection=4D-Lung",
        "collection studies": "v4/getPatientStudy?Collection=4D-Lung",
        "study": f"v4/getPatientStudy?StudyInstanceUID={changed.study_uid}",
        "study series": f"v4/getSeries?StudyInstanceUID={changed.study_uid}",
    }
    untouched = {
        "other collection": "v4/getSeries?Collection=TCGA-KIRC",
        "other series": f"v4/getSeries?SeriesInstanceUID={other.uid}",
        "other study": f"v4/getPatientStudy?StudyInstanceUID={other.study_uid}",
        "values": "v4/getModalityValues",
    }
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        for path in [*paths.values(), *untouched.values()]:
            _get(gateway, path)
        image = f"v4/getImage?SeriesInstanceUID={changed.uid}"
        other_image = f"v4/getImage?SeriesInstanceUID={other.uid}"
        _get(gateway, image)
        _get(gateway, other_image)
        first = _poll(gateway)
        assert first["outcome"] == "ok" and first["changed"] == 0, first
        assert first["form"] == "v2"  # the token-bearing v2 form, where the upstream has it

        nbia_upstream.app.mark_updated(
            changed.uid, description="RE-CURATED", study_description="RE-CURATED STUDY"
        )
        stale = _get(gateway, paths["series"])
        assert stale.headers["x-cache"] == "HIT" and "RE-CURATED" not in stale.text

        result = _poll(gateway)
        assert result["outcome"] == "ok", result
        assert changed.uid in result["changed_series"]
        assert sibling.uid not in result["changed_series"]
        assert result["purged_files"] == 1  # the changed series' kept zip, not the other's

        for name, path in paths.items():
            fresh = _get(gateway, path)
            assert fresh.headers["x-cache"] == "MISS", name
            assert "RE-CURATED" in fresh.text, name
        for name, path in untouched.items():
            assert _get(gateway, path).headers["x-cache"] == "HIT", name
        assert _get(gateway, other_image).headers["x-cache"] == "HIT"
        assert _get(gateway, image).headers["x-cache"] == "MISS"

        # The next window overlaps this one: the same rows come back and purge nothing.
        again = _poll(gateway)
        assert again["outcome"] == "ok" and again["repeated"] >= 1, again
        assert again["changed"] == 0 and again["purged_entries"] == 0
        for name, path in paths.items():
            assert _get(gateway, path).headers["x-cache"] == "HIT", name
        asked = nbia_upstream.app.requests_to("/v2/getUpdatedSeries")
        yesterday = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        assert asked[-1].query == f"fromDate={feed_date(yesterday, 'v2').replace('/', '%2F')}"
        assert asked[-1].headers.get("authorization", "").startswith("Bearer ")
        # Collection-level feeds were asked for the collections the cache holds.
        news = nbia_upstream.app.requests_to("/v4/NewPatientsInCollection")
        assert {r.query.split("&")[0] for r in news} >= {
            "Collection=4D-Lung",
            "Collection=TCGA-KIRC",
        }


def test_the_position_survives_a_restart(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        series = _cached_then_updated(gateway, nbia_upstream)
        assert _poll(gateway)["changed"] == 1
        _get_series(gateway, series)  # fresh, kept
        before = _feeds(gateway)
    assert before["last_success"] is not None
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        after = _feeds(gateway)
        assert after["last_success"] == before["last_success"]
        assert after["next_poll"] is not None and after["next_poll"] > after["last_success"]
        fresh = _get_series(gateway, series)
        assert fresh.headers["x-cache"] == "HIT"
        # What the last poll saw survived too: the overlap is no change.
        result = _poll(gateway)
        assert (result["changed"], result["purged_entries"]) == (0, 0), result
        assert _get_series(gateway, series).headers["x-cache"] == "HIT"


def test_a_failing_feed_backs_off_and_shows_in_the_stats_and_metrics(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        nbia_upstream.app.fail_next(2, status=500, path_contains="getUpdatedSeries")
        first = _poll(gateway)
        assert first["outcome"] == "failed" and first["failures"] == 1, first
        assert "500" in first["error"]
        second = _poll(gateway)
        assert second["failures"] == 2
        shown = _feeds(gateway)
        assert shown["failures"] == 2 and "500" in shown["last_error"]
        attempt = dt.datetime.fromisoformat(shown["last_attempt"])
        due = dt.datetime.fromisoformat(shown["next_poll"])
        assert due - attempt == dt.timedelta(seconds=60)  # 30 s, doubled
        assert shown["polls"]["failed"] == 2
        assert _poll(gateway)["outcome"] == "ok"
        shown = _feeds(gateway)
        assert shown["failures"] == 0 and shown["last_error"] is None
        metrics = httpx.get(f"{gateway.url}/metrics", timeout=30).text
        assert 'nbia_proxy_feed_polls_total{outcome="failed",upstream="nbia"} 2.0' in metrics
        assert 'nbia_proxy_feed_polls_total{outcome="ok",upstream="nbia"} 1.0' in metrics
        assert 'nbia_proxy_feed_last_success_timestamp_seconds{upstream="nbia"}' in metrics


def test_v4_is_asked_where_v2_is_not_served(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        series = _cached_then_updated(gateway, nbia_upstream)
        nbia_upstream.app.fail_next(1, status=404, path_contains="v2/getUpdatedSeries")
        result = _poll(gateway)
        assert result["outcome"] == "ok" and result["form"] == "v4", result
        assert series.uid in result["changed_series"]
        asked = nbia_upstream.app.requests_to("/v4/getUpdatedSeries")
        day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        assert asked[-1].query == f"fromDate={feed_date(day, 'v4')}"
        _poll(gateway)  # the form is remembered: v2 is not asked again
        assert len(nbia_upstream.app.requests_to("/v2/getUpdatedSeries")) == 1


def test_the_poll_endpoint_refuses_bad_input_and_is_absent_when_off(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    with GatewayServer(_settings(tmp_path / "on", nbia_upstream)) as gateway:
        answer = httpx.post(f"{gateway.url}/_proxy/feeds/poll?upstream=nope")
        assert answer.status_code == 400 and "nbia" in answer.json()["error"]
        answer = httpx.post(f"{gateway.url}/_proxy/feeds/poll?colection=x")
        assert answer.status_code == 400 and "unknown parameter" in answer.json()["error"]
    with GatewayServer(make_settings(tmp_path / "off", nbia_upstream.url)) as gateway:
        answer = httpx.post(f"{gateway.url}/_proxy/feeds/poll")
        assert answer.status_code == 404 and "update_poll_seconds" in answer.json()["error"]
        assert "feeds" not in httpx.get(f"{gateway.url}/_proxy/cache/stats").json()


def test_forced_polls_in_a_loop_ask_the_upstream_once_per_minimum(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    settings = _settings(tmp_path, nbia_upstream, update_forced_poll_seconds=3600)
    with GatewayServer(settings) as gateway:
        assert _poll(gateway)["outcome"] == "ok"
        for _ in range(5):
            answer = httpx.post(f"{gateway.url}/_proxy/feeds/poll?upstream=nbia", timeout=60)
            assert answer.status_code == 429, answer.text
            assert 3500 < int(answer.headers["retry-after"]) <= 3600
            body = answer.json()
            assert "update_forced_poll_seconds" in body["error"]
            assert body["upstreams"]["nbia"]["outcome"] == "too_soon"
        assert len(nbia_upstream.app.requests_to("getUpdatedSeries")) == 1
        # The other upstream was not asked yet: a poll of both asks it alone.
        both = httpx.post(f"{gateway.url}/_proxy/feeds/poll", timeout=60)
        assert both.status_code == 200, both.text
        outcomes = {name: r["outcome"] for name, r in both.json()["upstreams"].items()}
        assert outcomes == {"nbia": "too_soon", "nlst": "ok"}
        assert _feeds(gateway)["polls"]["too_soon"] == 6


def test_collections_made_up_by_clients_are_not_asked_about_at_every_poll(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    """A cached answer for a collection NBIA does not list (any client can ask for one) adds
    no feed requests: the poll asks NBIA's collection list once, and the feeds of those."""
    with GatewayServer(_settings(tmp_path, nbia_upstream)) as gateway:
        _get(gateway, "v4/getSeries?Collection=4D-Lung")
        for i in range(20):
            _get(gateway, f"v4/getSeries?Collection=made-up-{i}")
        result = _poll(gateway)
        assert result["outcome"] == "ok" and result["collections_asked"] == 1, result
        asked = nbia_upstream.app.requests_to("/v4/NewPatientsInCollection")
        assert [r.query.split("&")[0] for r in asked] == ["Collection=4D-Lung"]
        assert len(nbia_upstream.app.requests_to("/v4/getCollectionValues")) == 1


def test_two_gateways_on_one_postgresql_poll_once(
    tmp_path: Path, nbia_upstream: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy.feeds.poller, "FIRST_POLL_SECONDS", 0.0)
    with database("postgresql", tmp_path) as url:
        migrate(url)  # before either starts: two migrating at once is another test's matter
        first = GatewayServer(_settings(tmp_path / "a", nbia_upstream, database_url=url))
        second = GatewayServer(_settings(tmp_path / "b", nbia_upstream, database_url=url))
        with first, second:
            for upstream in ("nbia", "nlst"):  # both mounted on the one fake here
                outcomes = _first_rounds([first, second], upstream)
                assert sorted(outcomes) in (["busy", "ok"], ["not_due", "ok"]), outcomes
                # Either gateway shows the one position.
                shown = _feeds(first, upstream)["last_success"]
                assert shown == _feeds(second, upstream)["last_success"] is not None
            assert len(nbia_upstream.app.requests_to("getUpdatedSeries")) == 2


def test_a_poll_in_progress_elsewhere_is_not_repeated(
    tmp_path: Path, nbia_upstream: FakeServer, no_background_polls: None
) -> None:
    """Even a forced poll (the control endpoint) waits its turn: the lock, not the position."""
    with database("postgresql", tmp_path) as url:
        migrate(url)
        first = GatewayServer(_settings(tmp_path / "a", nbia_upstream, database_url=url))
        second = GatewayServer(_settings(tmp_path / "b", nbia_upstream, database_url=url))
        with first, second:
            gate = nbia_upstream.app.hold("getUpdatedSeries")
            results: list[dict[str, Any]] = []
            polling = threading.Thread(target=lambda: results.append(_poll(first)))
            polling.start()
            try:
                _wait_for(lambda: bool(nbia_upstream.app.requests_to("getUpdatedSeries")))
                assert _poll(second)["outcome"] == "busy"
            finally:
                gate.set()
                polling.join(60)
            assert results and results[0]["outcome"] == "ok", results
            assert len(nbia_upstream.app.requests_to("getUpdatedSeries")) == 1


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60  # generous: a wait for the other thread, not a speed check
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.02)


def _first_rounds(gateways: list[GatewayServer], upstream: str) -> list[str]:
    """What each gateway's poll loop did in its first round, once both have done it."""
    deadline = time.monotonic() + 60  # a generous wait for the loops, not a speed check
    while True:
        polls = [_feeds(g, upstream)["polls"] for g in gateways]
        done = [[k for k, v in p.items() if v] for p in polls]
        if all(done) or time.monotonic() > deadline:
            return [kinds[0] if kinds else "none" for kinds in done]
        time.sleep(0.05)

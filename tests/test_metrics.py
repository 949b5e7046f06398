"""/metrics: Prometheus's text format (parsed by prometheus-client's own parser), counters that
move by exactly what a scripted sequence of requests did, and sums across workers."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import build_access
from proxy.metrics import FAMILIES, PREFIX, Metrics
from proxy.shield.counters import ShieldCounters
from tests.fake_nbia import FakeServer
from tests.gateway_server import (
    START_SECONDS,
    Clock,
    GatewayFactory,
    GatewayProcess,
    GatewayServer,
    make_settings,
)
from tests.test_accounts import LabFactory, bearer, make_lab  # noqa: F401 (a fixture)

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
DAY = 86400.0

Figures = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Figures:
    """Every sample of a /metrics page, by name and labels."""
    figures: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            figures[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return figures


def scrape(url: str, **kwargs: Any) -> Figures:
    answer = httpx.get(url + "/metrics", timeout=30, **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def total(figures: Figures, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in figures.items() if n == PREFIX + name and wanted <= have)


def moved(before: Figures, after: Figures, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.fixture
def wall() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture
def make_gateway(make_gateway: GatewayFactory, wall: Clock) -> GatewayFactory:
    return functools.partial(make_gateway, cache_clock=wall)


def get(server: GatewayServer, path: str) -> httpx.Response:
    return httpx.get(server.url + path, timeout=30)


def test_every_family_is_shown_with_help_and_type(gw: GatewayServer) -> None:
    text = httpx.get(gw.url + "/metrics").text
    names = {family.name for family in text_string_to_metric_families(text)}
    for family in FAMILIES:
        assert PREFIX + family.name in names
        assert f"# HELP {PREFIX}{family.name}" in text
    # Base units and _total counters (prometheus.io naming).
    assert f"# TYPE {PREFIX}requests_total counter" in text
    assert f"# TYPE {PREFIX}request_duration_seconds histogram" in text


def test_each_request_is_counted_under_its_endpoint_class(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    before = scrape(gw.url)
    login = {"username": "alice", "password": "any", "grant_type": "password"}
    assert httpx.post(gw.url + "/nbia-api/oauth/token", data=login).status_code == 200
    uid = nbia_upstream.app.big_series_uid
    assert get(gw, f"/nbia-api/services/v4/getImage?SeriesInstanceUID={uid}").status_code == 200
    assert get(gw, SERIES).status_code == 200
    assert get(gw, "/nbia-api/services/v4/notCatalogued").status_code == 404
    after = scrape(gw.url)
    for kind in ("token", "binary", "metadata", "other"):
        assert moved(before, after, "requests_total", endpoint=kind) == 1, kind


@pytest.mark.parametrize("audit_log", [None, ""], ids=["audit-on", "audit-off"])
def test_a_miss_and_two_hits(make_gateway: GatewayFactory, audit_log: str | None) -> None:
    with make_gateway(audit_log=audit_log) as gw:
        before = scrape(gw.url)
        shortcut = gw.app.shortcut_hits
        miss = get(gw, SERIES)
        hits = [get(gw, SERIES), get(gw, SERIES)]
        # One more hit, from memory on the ASGI path (the shortcut keeps connections open).
        closing = httpx.get(gw.url + SERIES, headers={"Connection": "close"})
        after = scrape(gw.url)
    assert [a.headers["x-cache"] for a in [miss, *hits, closing]] == ["MISS", *["HIT"] * 3]
    assert gw.app.shortcut_hits - shortcut == 2  # two by the protocol's shortcut
    m = {"endpoint": "metadata", "method": "GET", "status": "2xx"}
    assert moved(before, after, "requests_total", **m, cache="MISS", outcome="ok") == 1
    assert moved(before, after, "requests_total", **m, cache="HIT", outcome="ok") == 3
    assert moved(before, after, "requests_total", endpoint="metadata") == 4
    assert moved(before, after, "response_bytes_total", source="cache") == 3 * len(miss.content)
    assert moved(before, after, "response_bytes_total", source="upstream") == len(miss.content)
    hist = "request_duration_seconds"
    assert moved(before, after, f"{hist}_count", endpoint="metadata", cache="HIT") == 3
    assert moved(before, after, f"{hist}_bucket", endpoint="metadata", cache="HIT", le="+Inf") == 3
    assert moved(before, after, f"{hist}_sum", endpoint="metadata", cache="HIT") > 0
    assert moved(before, after, "upstream_requests_total", upstream="nbia", outcome="2xx") == 1
    assert moved(before, after, "upstream_request_duration_seconds_count", upstream="nbia") == 1
    # The scrape is a control request; the first scrape counted itself only after answering.
    assert moved(before, after, "requests_total", endpoint="control") == 1


def test_scripted_sequence_moves_each_counter_by_the_right_amount(
    gw: GatewayServer, nbia_upstream: FakeServer, wall: Clock
) -> None:
    fake = nbia_upstream.app
    before = scrape(gw.url)
    get(gw, SERIES)  # a miss
    get(gw, SERIES), get(gw, SERIES)  # two hits
    # A stale answer: expired, and the upstream is down.
    wall.advance(2 * DAY)
    nbia_upstream.stop()
    stale = get(gw, SERIES)
    assert stale.headers["x-cache"] == "STALE"
    nbia_upstream.start()
    # An upstream 429 with Retry-After: the read is paused, retried, then answered.
    fake.fail_next(1, status=429, retry_after=1, path_contains="getSeries")
    retried = get(gw, f"{S}/v4/getSeries?Collection=4D-Lung")
    assert (retried.status_code, retried.headers["x-cache"]) == (200, "MISS")
    # A coalesced burst: ten identical cold requests, one upstream request.
    fake.slow(seconds_before_headers=1.0, path_contains="getSeries")
    cold = f"{S}/v4/getSeries?Collection=CPTAC-CCRCC"
    with ThreadPoolExecutor(max_workers=10) as pool:
        burst = list(pool.map(lambda _: get(gw, cold), range(10)))
    assert {a.status_code for a in burst} == {200}
    after = scrape(gw.url)

    def d(name: str, **labels: str) -> float:
        return moved(before, after, name, **labels)

    meta = {"endpoint": "metadata"}
    assert d("requests_total", **meta) == 1 + 2 + 1 + 1 + 10
    assert d("requests_total", **meta, cache="STALE") == 1
    assert d("stale_answers_total") == 1
    assert d("upstream_errors_total", upstream="nbia", kind="unreachable") >= 1
    assert d("upstream_overload_answers_total", status="429") == 1
    assert d("upstream_retry_after_pauses_total", upstream="nbia") == 1
    assert d("upstream_retry_after_pause_seconds_total", upstream="nbia") == 1
    assert d("upstream_retries_total") == 1
    assert d("upstream_requests_total", upstream="nbia", outcome="4xx") == 1
    # The burst: one went upstream, the others joined it or found the entry just stored.
    joined = d("requests_total", **meta, cache="JOINED")
    assert joined == d("coalesced_requests_total") >= 1
    burst_hits = d("requests_total", **meta, cache="HIT") - 2
    assert joined + burst_hits == 9
    # Misses: the first, the retried one and the burst's leader (each sent upstream).
    assert d("requests_total", **meta, cache="MISS") == 3
    assert d("upstream_requests_total", upstream="nbia", outcome="2xx") == 3
    assert total(after, "upstream_circuit_state", upstream="nbia", state="closed") == 1
    assert total(after, "upstream_queue_length", upstream="nbia") == 0
    assert total(after, "cache_entries") >= 3
    assert total(after, "cache_bytes") > 0


def test_off_when_disabled(make_gateway: GatewayFactory) -> None:
    with make_gateway(metrics_enabled=False) as gw:
        assert httpx.get(gw.url + "/metrics").status_code == 404
        assert gw.app.tally is None


def test_open_mode_with_a_metrics_token_needs_it(make_gateway: GatewayFactory) -> None:
    token = "scrape-secret-0123456789"
    with make_gateway(metrics_token=token) as gw:
        refused = httpx.get(gw.url + "/metrics")
        assert refused.status_code == 401 and token not in refused.text
        wrong = httpx.get(gw.url + "/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        scrape(gw.url, headers={"Authorization": f"Bearer {token}"})
        lines = gw.audit_lines(3)
        assert [line["status"] for line in lines] == [401, 401, 200]
        assert token not in json.dumps(lines)


def test_sums_across_two_workers(tmp_path: Path, nbia_upstream: FakeServer) -> None:
    data = tmp_path / "data"
    (data / "metrics").mkdir(parents=True)
    earlier = {"requests": {"\x1f".join(("metadata", "GET", "2xx", "HIT", "ok")): 1000}}
    (data / "metrics" / "1-earlier.json").write_text(json.dumps(earlier))  # a previous run's
    with GatewayProcess(nbia_upstream.url, data, "--workers", "2") as gateway:
        count = 24
        for _ in range(count):  # a new connection each: the kernel spreads them
            with httpx.Client() as client:
                assert client.get(gateway.url + SERIES, timeout=30).status_code == 200
        deadline = time.monotonic() + 20
        while True:
            figures = scrape(gateway.url)
            seen = total(figures, "requests_total", endpoint="metadata")
            files = list((data / "metrics").glob("*.json"))
            if (seen == count and len(files) == 2) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen == count
        assert len(files) == 2  # both workers write their figures
        shares = [json.loads(f.read_text())["requests"] for f in files]
        served = [sum(v for k, v in share.items() if k.startswith("metadata")) for share in shares]
        assert sum(served) == count and min(served) > 0, served  # both answered some
        assert total(figures, "upstream_circuit_state", upstream="nbia", state="closed") == 2
        # Whichever worker answers, the sums are the same.
        for _ in range(6):
            again = scrape(gateway.url)
            assert total(again, "requests_total", endpoint="metadata") == count


def test_accounts_mode_needs_an_admin_or_the_metrics_token(
    make_lab: LabFactory,  # noqa: F811 (the fixture imported above)
) -> None:
    token = "prometheus-0123456789abcdef"
    lab = make_lab(metrics_token=token, login_free_failures=1, login_lockout_max_seconds=30)
    assert lab.get("/metrics").status_code == 401
    assert lab.get("/metrics", bearer(lab.keys["alice"])).status_code == 403
    assert lab.get("/metrics", bearer("not-the-token")).status_code == 401
    before = scrape(lab.gw.url, headers=bearer(lab.keys["root"]))
    # Wrong keys from one address: past the free failure it is locked out, and refused.
    statuses = [lab.get(f"{S}/v4/getCollectionValues", bearer("wrong")).status_code for _ in "1234"]
    assert statuses[0] == 401 and statuses[-1] == 429
    after = scrape(lab.gw.url, headers=bearer(token))
    assert moved(before, after, "access_lockouts_total") == 1
    assert moved(before, after, "access_refusals_total", reason="lockout") == statuses.count(429)
    refused = {"endpoint": "metadata", "cache": "-"}
    assert moved(before, after, "requests_total", **refused, status="4xx") == 4
    lines = lab.gw.audit_lines(8)
    assert token not in json.dumps(lines) and lab.keys["root"] not in json.dumps(lines)


def metadata_requests(url: str, count: int, timeout: float = 20) -> float:
    """The summed count of metadata requests, once it reaches ``count`` (workers share their
    figures once a second); what it is when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        seen = total(scrape(url), "requests_total", endpoint="metadata")
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def test_a_worker_that_dies_takes_nothing_from_the_sums(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    psutil = pytest.importorskip("psutil")
    data = tmp_path / "data"
    with GatewayProcess(nbia_upstream.url, data, "--workers", "2") as gateway:
        for _ in range(20):
            with httpx.Client() as client:
                assert client.get(gateway.url + SERIES, timeout=30).status_code == 200
        assert metadata_requests(gateway.url, 20) == 20
        files = list((data / "metrics").glob("*.json"))
        owners = {int(f.name.split("-")[0]) for f in files}
        workers = [p for p in psutil.Process(gateway.pid).children() if p.pid in owners]
        assert len(workers) == 2
        workers[0].kill()  # no clean stop: only what it wrote before is left
        deadline = time.monotonic() + START_SECONDS  # a new worker's start
        while len(list((data / "metrics").glob("*.json"))) < 3 or workers[0].is_running():
            assert time.monotonic() < deadline, "uvicorn did not replace the worker"
            time.sleep(0.1)
        for _ in range(6):  # whichever worker answers, nothing went backwards
            assert metadata_requests(gateway.url, 20, timeout=0) == 20
        for _ in range(4):
            with httpx.Client() as client:
                assert client.get(gateway.url + SERIES, timeout=30).status_code == 200
        assert metadata_requests(gateway.url, 24) == 24
        assert len(list((data / "metrics").glob("*.json"))) == 3  # the dead one's file stays


def test_the_readme_lists_every_family_with_its_labels() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for family in FAMILIES:
        name = PREFIX + family.name + ("_total" if family.kind == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in family.labels) or "none"
        assert f"| `{name}` | {family.kind} | {labels} |" in readme, name


def test_the_binary_store_and_validation_failures_once_in_place(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "http://127.0.0.1:9", cache_enabled=False)
    counters = ShieldCounters()
    metrics = Metrics(counters, [], build_access(settings), None)
    kept = SimpleNamespace(evicted=3, write_failures=1, too_large=2, no_room=0)
    metrics.binary = SimpleNamespace(
        counters=kept, stats=lambda: SimpleNamespace(files=5, bytes=12345)
    )
    counters.tally.validation_failed("md5_mismatch")
    counters.tally.validation_failed("md5_mismatch")
    counters.tally.validation_failed("truncated")
    figures = parse(asyncio.run(metrics.render()).decode())
    assert total(figures, "binary_files") == 5 and total(figures, "binary_bytes") == 12345
    assert total(figures, "binary_evictions_total") == 3
    assert total(figures, "binary_not_kept_total", reason="too_large") == 2
    assert total(figures, "validation_failures_total", reason="md5_mismatch") == 2
    assert total(figures, "validation_failures_total", reason="truncated") == 1
    assert total(figures, "build_info") == 1


def test_service_token_renewals_and_failures(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    fake = nbia_upstream.app
    v2 = f"{S}/v2/getCollectionValues"
    before = scrape(gw.url)
    assert get(gw, v2).status_code == 200  # the service account logs in
    # Its token is revoked and both the refresh and a new login fail: one failed renewal.
    fake.fail_next(2, status=500, path_contains="oauth/token", include_token=True)
    fake.revoke_tokens()
    assert get(gw, v2 + "?format=json").status_code >= 500
    after = scrape(gw.url)
    renewals = "service_token_renewals_total"
    assert moved(before, after, renewals, upstream="nbia", outcome="ok") == 1
    assert moved(before, after, renewals, upstream="nbia", outcome="failed") == 1
    assert moved(before, after, "upstream_errors_total", kind="service_token") >= 1

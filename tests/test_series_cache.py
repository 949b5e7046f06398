"""The series cache end to end over real sockets: kept downloads, fills, checks, Range, offline.

The fake NBIA's request log says how many upstream requests each download cost.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tcia_utils import nbia

from proxy.tcia import gateway_url_builder
from tests.downloads import zip_path
from tests.fake_nbia import FakeServer
from tests.fake_nbia.app import SLOW_CHUNK
from tests.gateway_server import GatewayFactory, GatewayProcess, GatewayServer

S = "/nbia-api/services"


def _series(fake: FakeServer, collection: str = "4D-Lung") -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def _count(fake: FakeServer, suffix: str) -> int:
    return len(fake.app.requests_to(suffix))


def get(server: GatewayServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url + path, timeout=60, **kwargs)


def _kept_files(server: GatewayServer) -> list[Path]:
    root = server.settings.data_dir / "binaries"
    return [
        p for p in root.rglob("*") if p.is_file() and p.name[0] != "." and ".part-" not in p.name
    ]


_SAME = ("content-type", "content-disposition")


def test_second_zip_download_costs_nothing_and_is_identical(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    first = get(gw, zip_path(uid))
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    names = zipfile.ZipFile(io.BytesIO(first.content)).namelist()
    assert any(name.endswith(".dcm") for name in names)
    before = len(nbia_upstream.app.requests)
    second = get(gw, zip_path(uid))
    assert len(nbia_upstream.app.requests) == before  # nothing at all upstream
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert second.content == first.content
    assert {h: second.headers[h] for h in _SAME} == {h: first.headers[h] for h in _SAME}
    assert second.headers["content-length"] == str(len(first.content))
    assert second.headers["accept-ranges"] == "bytes"
    assert second.headers["etag"].startswith('"') and len(second.headers["etag"]) == 66
    assert int(second.headers["age"]) >= 0


def test_second_dicom_download_costs_nothing(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    sop = nbia_upstream.app.images.instances(uid)[0].sop_uid
    path = f"{S}/v4/getSingleImage?SeriesInstanceUID={uid}&SOPInstanceUID={sop}"
    first = get(gw, path)
    assert first.status_code == 200 and first.content[128:132] == b"DICM"
    second = get(gw, path)
    assert _count(nbia_upstream, "/v4/getSingleImage") == 1
    assert (second.headers["x-cache"], second.content) == ("HIT", first.content)
    assert {h: second.headers[h] for h in _SAME} == {h: first.headers[h] for h in _SAME}


def test_second_thumbnail_form_post_costs_nothing(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    sop = nbia_upstream.app.images.instances(uid)[0].sop_uid
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = f"seriesUID={uid}&objectUID={sop}"

    def post() -> httpx.Response:
        return httpx.post(gw.url + f"{S}/v4/getThumbnail", content=body, headers=form, timeout=60)

    first, second = post(), post()
    assert first.status_code == 200 and first.content.startswith(b"\xff\xd8")
    assert _count(nbia_upstream, "/v4/getThumbnail") == 1
    assert (second.headers["x-cache"], second.content) == ("HIT", first.content)
    assert second.headers["content-type"] == first.headers["content-type"]


def test_twenty_concurrent_cold_requests_make_one_upstream_request(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    # Slow enough that all twenty arrive while the one download is still running.
    nbia_upstream.app.slow(seconds_between_chunks=0.02, path_contains="getImage")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: get(gw, zip_path(uid)), range(20)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    assert _count(nbia_upstream, "/v4/getImage") == 1
    zipfile.ZipFile(io.BytesIO(answers[0].content)).testzip()


def test_a_joiner_gets_its_first_bytes_before_the_fill_ends(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    # Small chunks, and the upstream stops after three until the joiner has its first bytes:
    # the fill is surely running then, however loaded the machine (the last chunk received
    # is held back until the verdict, so two are released).
    nbia_upstream.app.slow(seconds_between_chunks=0.001, path_contains="getImage")
    gate = nbia_upstream.app.hold_body("getImage", after_bytes=3 * SLOW_CHUNK)
    url = gw.url + zip_path(uid)
    assert gw.app.series is not None
    fills = gw.app.series.fills
    with httpx.Client(timeout=60) as first, first.stream("GET", url) as started:
        chunks = started.iter_raw()
        head = next(chunks)  # the fill is under way
        with httpx.Client(timeout=60) as second, second.stream("GET", url) as joined:
            assert joined.headers["x-cache"] == "MISS"
            joined_chunks = joined.iter_raw()
            joined_head = next(joined_chunks)
            assert fills.in_progress == 1  # the first byte came while the fill runs
            gate.set()
            whole = head + b"".join(chunks)
            assert joined_head + b"".join(joined_chunks) == whole
    assert _count(nbia_upstream, "/v4/getImage") == 1
    assert fills.counters.joined == 1


@pytest.mark.parametrize(
    "fault",
    [
        lambda fake: fake.close_zip_after(1, times=1),
        lambda fake: fake.alter_image(1, times=1),
    ],
    ids=["short-zip", "altered-image"],
)
def test_a_bad_zip_aborts_the_transfer_is_not_kept_and_is_fetched_again(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, fault: Callable[[Any], None]
) -> None:
    uid = _series(nbia_upstream)
    path = zip_path(uid, "v4/getImageWithMD5Hash")
    with make_gateway() as gw:
        fault(nbia_upstream.app)
        with pytest.raises(httpx.HTTPError):
            get(gw, path)
        assert _kept_files(gw) == []
        good = get(gw, path)
        assert (good.status_code, good.headers["x-cache"]) == (200, "MISS")
        assert zipfile.ZipFile(io.BytesIO(good.content)).testzip() is None
        assert get(gw, path).headers["x-cache"] == "HIT"
        assert _count(nbia_upstream, "/v4/getImageWithMD5Hash") == 2
        assert gw.app.series is not None
        assert sum(gw.app.series.fills.counters.failures.values()) == 1
        # ... and /metrics counts it by reason.
        metrics = text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)
        failures = [
            sample
            for family in metrics
            for sample in family.samples
            if sample.name == "nbia_proxy_validation_failures_total"
        ]
        reasons = set(gw.app.series.fills.counters.failures)
        assert [(s.labels["reason"], s.value) for s in failures] == [(reasons.pop(), 1.0)]


def test_a_failed_fill_aborts_every_reader(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    # The answer's head comes late, so that all five readers are in before the zip ends short.
    nbia_upstream.app.slow(seconds_before_headers=1.0, path_contains="getImage")
    nbia_upstream.app.close_zip_after(2, times=1)
    path = zip_path(uid, "v4/getImageWithMD5Hash")
    assert gw.app.series is not None
    fills = gw.app.series.fills

    def fetch(_: int) -> str:
        try:
            get(gw, path)
        except httpx.HTTPError:
            return "aborted"
        return "complete"

    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(fetch, range(5)))
    assert fills.counters.started + fills.counters.joined == 5
    assert outcomes == ["aborted"] * 5
    assert _count(nbia_upstream, "/v4/getImageWithMD5Hash") == 1
    assert _kept_files(gw) == []


def test_connection_dropped_mid_zip_keeps_nothing_and_the_retry_succeeds(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    nbia_upstream.app.cut_stream(2000, mode="abort", times=1)
    with pytest.raises(httpx.HTTPError):
        get(gw, zip_path(uid))
    assert _kept_files(gw) == []
    # The download started over in the background: the retry joins it (or finds it kept).
    retry = get(gw, zip_path(uid))
    assert retry.status_code == 200
    zipfile.ZipFile(io.BytesIO(retry.content)).testzip()
    assert get(gw, zip_path(uid)).headers["x-cache"] == "HIT"
    assert _count(nbia_upstream, "/v4/getImage") == 2
    assert gw.app.series is not None and gw.app.series.fills.counters.retried == 1


def test_ranges_and_head_on_a_kept_file(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    whole = get(gw, zip_path(uid)).content
    size = len(whole)
    part = get(gw, zip_path(uid), headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.content) == (206, whole[10:20])
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    suffix = get(gw, zip_path(uid), headers={"Range": "bytes=-5"})
    assert (suffix.status_code, suffix.content) == (206, whole[-5:])
    beyond = get(gw, zip_path(uid), headers={"Range": f"bytes={size}-"})
    assert (beyond.status_code, beyond.headers["content-range"]) == (416, f"bytes */{size}")
    etag = part.headers["etag"]
    matching = get(gw, zip_path(uid), headers={"Range": "bytes=0-0", "If-Range": etag})
    assert (matching.status_code, matching.content) == (206, whole[:1])
    other = get(gw, zip_path(uid), headers={"Range": "bytes=0-0", "If-Range": '"other"'})
    assert (other.status_code, other.content) == (200, whole)
    head = httpx.head(gw.url + zip_path(uid), timeout=60)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(size)
    assert head.headers["x-cache"] == "HIT"
    assert _count(nbia_upstream, "/v4/getImage") == 1


def test_a_range_on_a_fill_in_progress(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    # Five chunks: slow enough that the range arrives before the fill ends on a loaded machine.
    nbia_upstream.app.slow(seconds_between_chunks=0.25, path_contains="getImage")
    url = gw.url + zip_path(uid)
    with httpx.Client(timeout=60) as first, first.stream("GET", url) as started:
        chunks = started.iter_raw()
        head = next(chunks)
        part = httpx.get(url, headers={"Range": "bytes=0-99"}, timeout=60)
        assert part.status_code == 206
        assert part.headers["content-range"] == "bytes 0-99/*"
        whole = head + b"".join(chunks)
    assert part.content == whole[:100]
    assert _count(nbia_upstream, "/v4/getImage") == 1


def test_kept_files_are_served_while_the_upstream_is_down_and_offline(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    other = _series(nbia_upstream, "TCGA-KIRC")
    with make_gateway() as gw:
        kept = get(gw, zip_path(uid)).content
        nbia_upstream.stop()
        try:
            down = get(gw, zip_path(uid))
            assert (down.headers["x-cache"], down.content) == ("HIT", kept)
            missing = get(gw, zip_path(other))
            assert missing.status_code in (502, 503, 504)
            assert "error" in missing.json()
        finally:
            nbia_upstream.start()
    with make_gateway(offline=True) as gw:
        served = get(gw, zip_path(uid))
        assert (served.headers["x-cache"], served.content) == ("HIT", kept)
        refused = get(gw, zip_path(other))
        assert refused.status_code == 504
        assert refused.json()["error"] == "offline and not cached"


def test_a_fill_goes_on_when_its_only_client_leaves(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    nbia_upstream.app.slow(seconds_between_chunks=0.01, path_contains="getImage")
    url = gw.url + zip_path(uid)
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as started:
        next(started.iter_raw())  # then hang up
    assert gw.app.series is not None
    fills = gw.app.series.fills
    # Wait (without a clock bound) until the background fill has ended.
    while fills.in_progress:
        threading.Event().wait(0.05)
    again = get(gw, zip_path(uid))
    assert again.headers["x-cache"] == "HIT"
    assert _count(nbia_upstream, "/v4/getImage") == 1
    zipfile.ZipFile(io.BytesIO(again.content)).testzip()


def test_an_unwritable_binary_dir_still_relays(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    uid = _series(nbia_upstream)
    with make_gateway(binary_dir=blocked / "binaries") as gw:
        first = get(gw, zip_path(uid))
        second = get(gw, zip_path(uid))
        assert first.status_code == second.status_code == 200
        assert first.content == second.content
        assert _count(nbia_upstream, "/v4/getImage") == 2
        assert gw.app.series is not None
        assert gw.app.series.store.counters.write_failures >= 1


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_tcia_utils_download_series_twice_costs_tcia_nothing_the_second_time(
    monkeypatch: pytest.MonkeyPatch, gw: GatewayServer, nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uids = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"][:2]
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gw.url))
    nbia.downloadSeries(uids, input_type="list", path=str(tmp_path / "first"))
    downloads = _count(nbia_upstream, "/v4/getImage")
    assert downloads == 2
    nbia.downloadSeries(uids, input_type="list", path=str(tmp_path / "second"))
    assert _count(nbia_upstream, "/v4/getImage") == downloads
    first, second = _tree(tmp_path / "first"), _tree(tmp_path / "second")
    assert first == second
    assert sum(name.endswith(".dcm") for name in first) >= 4


def test_tcia_utils_reports_a_short_zip_instead_of_saving_it(
    monkeypatch: pytest.MonkeyPatch, gw: GatewayServer, nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uid = _series(nbia_upstream)
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gw.url))
    nbia_upstream.app.close_zip_after(1, times=1)
    nbia.downloadSeries([uid], input_type="list", path=str(tmp_path / "short"))
    assert not (tmp_path / "short" / uid).exists()  # tcia-utils saw a failed download
    assert _kept_files(gw) == []
    nbia.downloadSeries([uid], input_type="list", path=str(tmp_path / "short"))
    direct = tmp_path / "direct"
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(nbia_upstream.url))
    nbia.downloadSeries([uid], input_type="list", path=str(direct))
    assert _tree(tmp_path / "short") == _tree(direct)


def test_a_binary_hit_has_its_audit_line(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    uid = _series(nbia_upstream)
    get(gw, zip_path(uid))
    hit = get(gw, zip_path(uid))
    lines = [line for line in gw.audit_lines(2) if line["path"].endswith("/v4/getImage")]
    assert [(line["cache"], line["bytes"]) for line in lines] == [
        ("MISS", len(hit.content)),
        ("HIT", len(hit.content)),
    ]
    assert lines[1]["user"] == "anonymous" and uid in lines[1]["query"]


def test_head_on_a_fill_in_progress_waits_for_the_kept_file(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    nbia_upstream.app.slow(seconds_between_chunks=0.02, path_contains="getImage")
    url = gw.url + zip_path(uid)
    with httpx.Client(timeout=60) as first, first.stream("GET", url) as started:
        chunks = started.iter_raw()
        whole = next(chunks)
        head = httpx.head(url, timeout=60)
        whole += b"".join(chunks)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(whole))
    assert _count(nbia_upstream, "/v4/getImage") == 1


def test_no_cache_fetches_again_and_replaces_the_kept_file(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    get(gw, zip_path(uid))
    fresh = get(gw, zip_path(uid), headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "MISS"
    again = get(gw, zip_path(uid))
    assert (again.headers["x-cache"], again.content) == ("HIT", fresh.content)
    assert _count(nbia_upstream, "/v4/getImage") == 2
    assert len(_kept_files(gw)) == 1


def test_an_open_circuit_serves_kept_files_and_refuses_the_rest(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    other = _series(nbia_upstream, "TCGA-KIRC")
    settings = {"circuit_probe_seconds": 0, "circuit_cooldown_seconds": 600}
    with make_gateway(circuit_failure_threshold=1, retry_max_attempts=0, **settings) as gw:
        kept = get(gw, zip_path(uid)).content
        nbia_upstream.app.fail_next(1, status=502, path_contains="getSeries")
        failed = get(gw, f"{S}/v4/getSeries?Collection=4D-Lung")  # opens the circuit
        assert failed.status_code == 502
        assert next(u.breaker for u in gw.app.upstreams if u.name == "nbia").refusing
        before = len(nbia_upstream.app.requests)
        served = get(gw, zip_path(uid))
        assert (served.headers["x-cache"], served.content) == ("HIT", kept)
        refused = get(gw, zip_path(other))
        assert refused.status_code == 503 and "error" in refused.json()
        assert len(nbia_upstream.app.requests) == before


def test_without_background_fills_a_client_leaving_stops_the_download(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    nbia_upstream.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
    with make_gateway(binary_fill_in_background=False) as gw:
        assert gw.app.series is not None
        fills = gw.app.series.fills
        url = gw.url + zip_path(uid)
        with httpx.Client(timeout=60) as client, client.stream("GET", url) as started:
            next(started.iter_raw())
        while fills.in_progress:
            threading.Event().wait(0.05)
        assert fills.counters.failures["cancelled"] == 1
        assert _kept_files(gw) == []


def test_two_gateways_on_one_data_dir_serve_each_others_kept_files(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream)
    with make_gateway() as one, make_gateway() as two:
        first = get(one, zip_path(uid))
        # The last byte reaches the client once the zip is checked; the file is renamed into
        # place and its row written just after. Wait (no clock bound) until the fill has ended,
        # else the other gateway rightly finds nothing kept yet.
        assert one.app.series is not None
        while one.app.series.fills.in_progress:
            threading.Event().wait(0.05)
        second = get(two, zip_path(uid))
    assert (second.headers["x-cache"], second.content) == ("HIT", first.content)
    assert _count(nbia_upstream, "/v4/getImage") == 1


def test_kill_9_during_a_fill_leaves_nothing_that_is_served(
    nbia_upstream: FakeServer, tmp_path: Path
) -> None:
    uid = _series(nbia_upstream)
    nbia_upstream.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
    data = tmp_path / "data"
    with GatewayProcess(nbia_upstream.url, data) as gateway:
        url = gateway.url + zip_path(uid)
        with httpx.Client(timeout=60) as client, client.stream("GET", url) as started:
            chunks = started.iter_raw()
            next(chunks)
            assert any(".part-" in p.name for p in (data / "binaries").rglob("*"))
            os.kill(gateway.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                b"".join(chunks)
    nbia_upstream.app.slow()
    with GatewayProcess(nbia_upstream.url, data) as gateway:
        assert not any(".part-" in p.name for p in (data / "binaries").rglob("*"))  # swept
        again = httpx.get(gateway.url + zip_path(uid), timeout=60)
        assert again.headers["x-cache"] == "MISS"
        zipfile.ZipFile(io.BytesIO(again.content)).testzip()


def test_a_fill_stopped_while_it_commits_leaves_the_file_to_the_commit_thread(
    monkeypatch: pytest.MonkeyPatch, gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """A stop (the gateway shutting down) while the kept file's fsync runs in its thread: the
    file is not closed and removed under that thread (its fsync then failed with EBADF); the
    commit sees the stop before it reads the file back for its sha256, and gives it up."""
    from proxy.binary import files

    fsyncing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if not fsyncing.is_set():
            fsyncing.set()
            release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", slow_fsync)
    uid = _series(nbia_upstream)
    answer = get(gw, zip_path(uid))  # the end is released before the fsync
    assert answer.status_code == 200 and fsyncing.wait(30)
    series = gw.app.series
    assert series is not None
    (filling,) = series.fills._fills.values()
    assert filling.task is not None
    filling.task.get_loop().call_soon_threadsafe(filling.task.cancel)
    pause = threading.Event()
    pause.wait(0.5)  # the cancelled fill has had its chance to close the file
    release.set()
    for _ in range(600):  # until the fill has ended (not a time limit on it: 30 s to fail)
        if filling.task.done():
            break
        pause.wait(0.05)
    assert filling.task.done()
    assert series.store.counters.write_failures == 0
    assert filling.kept is None and _kept_files(gw) == []
    assert not [p for p in gw.settings.data_dir.rglob("*") if ".part-" in p.name]

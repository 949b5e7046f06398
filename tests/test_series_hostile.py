"""The series cache against hostile (or careless) clients, over real sockets: what a client can
make the gateway download for the few bytes it sends, and readers in other processes.

Waits poll the gateway's own counters with no clock bound (a loaded CI machine is slow).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from proxy.binary.fill import Fills
from tests.downloads import until, zip_path
from tests.fake_nbia import FakeServer
from tests.fake_nbia.app import SLOW_CHUNK
from tests.gateway_server import GatewayFactory, GatewayProcess, GatewayServer, make_settings

S = "/nbia-api/services"
MIB = 1024 * 1024


def _series(fake: FakeServer, collection: str) -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def _fills(server: GatewayServer) -> Fills:
    assert server.app.series is not None
    return server.app.series.fills


def _kept_files(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.is_file() and p.name[0] != "." and ".part-" not in p.name
    ]


def _start_and_hang_up(url: str, headers: dict[str, str] | None = None) -> None:
    """A client that reads the first bytes of a download, then disconnects."""
    with httpx.Client(timeout=60) as client, client.stream("GET", url, headers=headers) as answer:
        next(answer.iter_raw())


def test_fills_left_alone_beyond_the_cap_are_cancelled_and_keep_nothing(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """A client that starts cold downloads and hangs up at once gets at most
    binary_max_background_fills of them downloaded for nobody; the rest stop at once."""
    one, two = _series(nbia_upstream, "4D-Lung"), _series(nbia_upstream, "TCGA-KIRC")
    nbia_upstream.app.slow(seconds_between_chunks=0.001, path_contains="getImage")
    # Neither download can end before the second has been stopped, however loaded the machine.
    held = [nbia_upstream.app.hold_body(uid, after_bytes=2 * SLOW_CHUNK) for uid in (one, two)]
    with make_gateway(binary_max_background_fills=1) as gw:
        fills = _fills(gw)
        _start_and_hang_up(gw.url + zip_path(one))
        until(lambda: fills.counters.background == 1)  # the first goes on alone
        _start_and_hang_up(gw.url + zip_path(two))
        until(lambda: fills.counters.stopped_alone == 1)
        for gate in held:
            gate.set()
        until(lambda: fills.in_progress == 0)
        assert fills.counters.stopped_alone == 1
        assert fills.counters.failures["cancelled"] == 1
        assert fills.counters.kept == 1
        assert len(_kept_files(gw.settings.data_dir / "binaries")) == 1
        nbia_upstream.app.slow()
        assert httpx.get(gw.url + zip_path(one), timeout=60).headers["x-cache"] == "HIT"
        assert httpx.get(gw.url + zip_path(two), timeout=60).headers["x-cache"] == "MISS"
        stats = httpx.get(gw.url + "/_proxy/cache/stats", timeout=60).json()
        assert stats["binaries"]["fills_stopped_alone"] == 1


def test_a_range_on_a_cold_key_is_relayed_and_starts_no_fill(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """``bytes=0-0`` must not make the gateway download the whole series: the range goes to
    the upstream, and the gateway reads no more than the client does."""
    uid = _series(nbia_upstream, "4D-Lung")
    nbia_upstream.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
    with make_gateway() as gw:
        fills = _fills(gw)
        url = gw.url + zip_path(uid)
        _start_and_hang_up(url, {"Range": "bytes=0-0"})
        asked = nbia_upstream.app.requests_to("/v4/getImage")
        assert [r.headers.get("range") for r in asked] == ["bytes=0-0"]
        assert (fills.counters.started, fills.in_progress) == (0, 0)
        assert _kept_files(gw.settings.data_dir / "binaries") == []
        # A resume on a download left going on alone is served from it, not relayed.
        _start_and_hang_up(url)
        until(lambda: fills.counters.background == 1)
        resumed = httpx.get(url, headers={"Range": "bytes=100-"}, timeout=60)
        assert resumed.status_code == 206
        assert len(nbia_upstream.app.requests_to("/v4/getImage")) == 2


def test_head_on_a_cold_key_starts_no_fill(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    uid = _series(nbia_upstream, "4D-Lung")
    with make_gateway() as gw:
        head = httpx.head(gw.url + zip_path(uid), timeout=60)
        assert (head.status_code, head.content) == (200, b"")
        asked = nbia_upstream.app.requests_to("/v4/getImage")
        assert [r.method for r in asked] == ["HEAD"]  # relayed as a HEAD, not a download
        assert _fills(gw).counters.started == 0
        assert _kept_files(gw.settings.data_dir / "binaries") == []


def test_a_reader_in_another_process_finishes_after_the_file_is_evicted(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    """Eviction knows only its own process's readers; the hit path opens the kept file once
    and reads that descriptor, so unlinking the file under another process's reader is safe."""
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(48 * MIB)  # more than the socket buffers hold
    big, small = fake.big_series_uid, _series(nbia_upstream, "4D-Lung")
    data = tmp_path / "data"
    binaries = data / "binaries"
    with GatewayProcess(nbia_upstream.url, data) as reader:
        first = httpx.get(reader.url + zip_path(big), timeout=120)
        assert first.status_code == 200
        whole = hashlib.sha256(first.content).hexdigest()
        until(lambda: len(_kept_files(binaries)) == 1)  # renamed into place after its end
        (kept,) = _kept_files(binaries)
        url = reader.url + zip_path(big)
        with httpx.Client(timeout=120) as client, client.stream("GET", url) as hit:
            assert hit.headers["x-cache"] == "HIT"
            chunks = hit.iter_raw()
            received = next(chunks)  # the reader's process holds the file open, mid-transfer
            # Another gateway on the same data dir, whose cap fits one of the two: keeping
            # the small series evicts the big one, which this process is not reading.
            settings = make_settings(
                data,
                nbia_upstream.url,
                nlst_upstream.url,
                binary_cache_max_bytes=len(first.content) + 1,
            )
            with GatewayServer(settings) as evictor:
                assert httpx.get(evictor.url + zip_path(small), timeout=60).status_code == 200
                until(lambda: _fills(evictor).in_progress == 0)  # kept (fsync, row) after its end
                assert evictor.app.series is not None
                assert evictor.app.series.store.counters.evicted == 1
            assert not kept.exists()
            received += b"".join(chunks)
    assert hashlib.sha256(received).hexdigest() == whole

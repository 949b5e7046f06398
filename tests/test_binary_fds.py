"""Descriptors of the series cache over real sockets: readers that leave fills, and fills
stopped when they do, give back every file descriptor they took (the temporary file, its read
side, the kept file opened for a hit).

The gateway runs in this process (:class:`tests.gateway_server.GatewayServer`), so its
descriptors are this process's ``/proc/self/fd``. Waits poll the gateway's counters with no
clock bound.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from proxy.binary.fill import Fills
from tests.downloads import fd_targets, open_fds, until
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
CYCLES = 6

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


def _hang_up_after_first_bytes(url: str) -> None:
    with httpx.Client(timeout=60) as client, client.stream("GET", url) as answer:
        next(answer.iter_raw())


def _series(fake: FakeServer, collection: str) -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def _fills(server: GatewayServer) -> Fills:
    assert server.app.series is not None
    return server.app.series.fills


def _binary_fds(directory: Path) -> list[str]:
    return [t for t in fd_targets(open_fds()) if t.startswith(str(directory))]


@pytest.mark.parametrize("background", [False, True])
def test_readers_that_leave_fills_leak_no_descriptor(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer, background: bool
) -> None:
    """Clients that hang up mid-download, again and again: each fill is stopped when its
    reader leaves (background off, or binary_max_background_fills=0), keeps nothing, and no
    descriptor of the binary directory (temporary file, read side) stays open."""
    uid = _series(nbia_upstream, "4D-Lung")
    settings = make_settings(
        tmp_path,
        nbia_upstream.url,
        nlst_upstream.url,
        binary_fill_in_background=background,
        binary_max_background_fills=0,
    )
    nbia_upstream.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
    with GatewayServer(settings) as gw:
        fills = _fills(gw)
        url = f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}"
        binaries = gw.settings.data_dir / "binaries"
        for cycle in range(1, CYCLES + 1):
            _hang_up_after_first_bytes(url)
            until(lambda cycle=cycle: fills.counters.stopped_alone == cycle)  # type: ignore[misc]
            until(lambda: fills.in_progress == 0)
        assert fills.counters.failures["cancelled"] == CYCLES
        assert fills.counters.kept == 0
        # A fill leaves the registry only once its file is discarded and its read side closed.
        assert _binary_fds(binaries) == []
        assert [p for p in binaries.rglob("*") if ".part-" in p.name] == []


def test_hits_and_joined_fills_give_back_their_descriptors(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    """Readers of a fill that leave early, a full fill, then hits read whole and hits left
    early: afterwards the process holds no more descriptors than after the first download."""
    uid = _series(nbia_upstream, "4D-Lung")
    settings = make_settings(tmp_path, nbia_upstream.url, nlst_upstream.url)
    with GatewayServer(settings) as gw:
        fills = _fills(gw)
        url = f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}"
        binaries = gw.settings.data_dir / "binaries"
        with httpx.Client(timeout=60) as client:
            assert client.get(url).headers["x-cache"] == "MISS"  # pools, database, threads
        before = open_fds()
        nbia_upstream.app.slow(seconds_between_chunks=0.05, path_contains="getImage")
        for _ in range(3):
            # a fresh fill (no-cache) that two readers leave: it goes on alone, then is kept
            kept = fills.counters.kept
            headers = {"Cache-Control": "no-cache"}
            with httpx.Client(timeout=60) as client:
                with client.stream("GET", url, headers=headers) as first:
                    next(first.iter_raw())
                    with client.stream("GET", url, headers=headers) as joiner:
                        next(joiner.iter_raw())
            until(lambda kept=kept: fills.counters.kept == kept + 1)  # type: ignore[misc]
            until(lambda: fills.in_progress == 0)
        nbia_upstream.app.slow()
        for _ in range(3):
            with httpx.Client(timeout=60) as client:
                assert client.get(url).headers["x-cache"] == "HIT"
                with client.stream("GET", url) as answer:
                    next(answer.iter_raw())
        # A hit's handler may still be closing its file when the client has hung up.
        until(lambda: not _binary_fds(binaries))
        assert [t for t in fd_targets(open_fds() - before) if "binaries" in t] == []

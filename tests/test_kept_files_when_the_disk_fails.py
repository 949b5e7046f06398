"""A series cache whose disk is full or read-only never fails a download, and says so once.

``binary_dir`` is a real 4 MB tmpfs (skipped where the test may not mount one), filled to the
last byte, or remounted read-only, while the gateway runs: every download is still relayed with
the upstream's bytes, the failure is logged once (not once per download) and counted in
``/_proxy/cache/stats``, and once the disk has room again downloads are kept again.
"""

from __future__ import annotations

import functools
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayFactory, GatewayServer, cache_stats
from tests.test_failsafe_store import fill, small_disk

__all__ = ["small_disk"]  # the fixture, used by name below

S = "/nbia-api/services"


@pytest.fixture
def make_gateway(make_gateway: GatewayFactory, small_disk: Path) -> GatewayFactory:
    # The database and the audit log live elsewhere: only the kept files are on the small disk.
    return functools.partial(
        make_gateway, binary_dir=small_disk / "binaries", binary_cache_max_bytes=2 * 1024 * 1024
    )


@pytest.fixture
def paths(nbia_upstream: FakeServer) -> list[str]:
    """Downloads of four series."""
    series = nbia_upstream.app.dataset.series[:4]
    return [f"{S}/v4/getImage?SeriesInstanceUID={s.uid}" for s in series]


@pytest.fixture
def binary_warnings(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The warnings about the binary cache logged so far."""
    caplog.set_level(logging.INFO)

    def logged() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and "binary cache" in r.getMessage()
        ]

    return logged


def relayed_each_once(gw: GatewayServer, fake: FakeServer, paths: list[str]) -> None:
    for path in paths:
        before = len(fake.app.requests_to("/v4/getImage"))
        answer = httpx.get(gw.url + path, timeout=60)
        assert answer.status_code == 200
        assert answer.content == httpx.get(fake.url + path, timeout=60).content
        # The gateway's own request, and the test's direct one.
        assert len(fake.app.requests_to("/v4/getImage")) == before + 2


def test_a_full_disk_relays_every_download_logs_once_and_keeps_again_with_room(
    gw: GatewayServer,
    small_disk: Path,
    nbia_upstream: FakeServer,
    paths: list[str],
    binary_warnings: Callable[[], list[str]],
) -> None:
    fill(small_disk)
    relayed_each_once(gw, nbia_upstream, paths[:3])
    relayed_each_once(gw, nbia_upstream, paths[:1])  # still not kept: fetched again
    stats = cache_stats(gw, "binaries")
    assert stats["files"] == 0 and stats["write_failures"] == 4
    assert "No space left" in str(stats["last_write_failure"])
    assert len(binary_warnings()) == 1, binary_warnings()
    (small_disk / "filler").unlink()
    first = httpx.get(gw.url + paths[3], timeout=60)
    second = httpx.get(gw.url + paths[3], timeout=60)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert cache_stats(gw, "binaries")["files"] == 1


def test_a_read_only_binary_dir_relays_every_download_and_logs_once(
    gw: GatewayServer,
    small_disk: Path,
    nbia_upstream: FakeServer,
    paths: list[str],
    binary_warnings: Callable[[], list[str]],
) -> None:
    remount = ["mount", "-o", "remount,ro", str(small_disk)]
    done = subprocess.run(remount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    try:
        relayed_each_once(gw, nbia_upstream, paths[:3])
        stats = cache_stats(gw, "binaries")
        assert stats["files"] == 0 and stats["write_failures"] == 3
        assert "Read-only" in str(stats["last_write_failure"])
        assert len(binary_warnings()) == 1, binary_warnings()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    first = httpx.get(gw.url + paths[3], timeout=60)
    assert first.headers["x-cache"] == "MISS"
    assert httpx.get(gw.url + paths[3], timeout=60).headers["x-cache"] == "HIT"

"""A zip is checked against NBIA's own numbers (getSeriesSize), fetched through the gateway's
metadata cache; without them it is kept only when complete and CRC-clean, recorded as checked
less (``validation`` ``self`` instead of ``full``), end to end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from proxy.binary.tables import BinaryFile
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"


@pytest.fixture
def gw(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    settings = make_settings(tmp_path, nbia_upstream.url, retry_max_attempts=0)
    with GatewayServer(settings) as server:
        yield server


def series_of(fake: FakeServer, collection: str = "4D-Lung") -> str:
    return next(s.uid for s in fake.app.dataset.series if s.collection == collection)


def validations(gw: GatewayServer) -> list[str]:
    """How each kept file was checked, once every fill has ended."""
    series = gw.app.series
    assert series is not None
    while series.fills.in_progress:
        threading.Event().wait(0.05)
    with Session(series.store.engine) as session:
        return list(session.scalars(select(BinaryFile.validation)))


def test_nbias_numbers_come_through_the_metadata_cache_and_the_file_is_fully_checked(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = series_of(nbia_upstream)
    size = httpx.get(f"{gw.url}{S}/v4/getSeriesSize?SeriesInstanceUID={uid}", timeout=60)
    assert (size.status_code, size.headers["x-cache"]) == (200, "MISS")
    zipped = httpx.get(f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}", timeout=60)
    assert zipped.status_code == 200
    # The fill's getSeriesSize was the cached answer: TCIA was asked once.
    assert len(nbia_upstream.app.requests_to("/v4/getSeriesSize")) == 1
    assert validations(gw) == ["full"]


def test_without_nbias_numbers_a_complete_zip_is_kept_as_checked_less(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = series_of(nbia_upstream)
    nbia_upstream.app.fail_next(1, status=500, path_contains="getSeriesSize")
    path = f"{S}/v4/getImage?SeriesInstanceUID={uid}"
    first = httpx.get(gw.url + path, timeout=60)
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert len(nbia_upstream.app.requests_to("/v4/getSeriesSize")) == 1
    assert validations(gw) == ["self"]
    second = httpx.get(gw.url + path, timeout=60)
    assert (second.headers["x-cache"], second.content) == ("HIT", first.content)


def test_without_nbias_numbers_a_corrupt_zip_is_still_refused(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = series_of(nbia_upstream)
    nbia_upstream.app.fail_next(1, status=500, path_contains="getSeriesSize")
    nbia_upstream.app.cut_stream(3000, mode="clean", times=1, path_contains="getImage")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{gw.url}{S}/v4/getImage?SeriesInstanceUID={uid}", timeout=60)
    assert validations(gw) == []

"""Every binary endpoint the fake NBIA serves is kept, in each generation, and each request
variant is a file of its own.

tests/test_series_cache.py covers v4 ``getImage``, ``getImageWithMD5Hash``, ``getSingleImage``
and the v4 ``getThumbnail`` form POST; here the same second-download-costs-nothing rule runs for
the v1 and v2 zips and DICOM files and the root thumbnail, and ``NewFileNames``/``IncludeMD5``
(which change the zip NBIA writes) are shown to be kept apart, each served with its own bytes.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def gw(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url)) as server:
        yield server


def series_and_image(fake: FakeServer) -> tuple[str, str]:
    uid = next(s.uid for s in fake.app.dataset.series if s.collection == "4D-Lung")
    return uid, fake.app.images.instances(uid)[0].sop_uid


def kept_files(gw: GatewayServer) -> list[Path]:
    root = gw.settings.data_dir / "binaries"
    return [
        p for p in root.rglob("*") if p.is_file() and p.name[0] != "." and ".part-" not in p.name
    ]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "v1/getImage?SeriesInstanceUID={uid}", ""),
        ("GET", "v2/getImage?SeriesInstanceUID={uid}", ""),
        ("GET", "v1/getImageWithMD5Hash?SeriesInstanceUID={uid}", ""),
        ("GET", "v2/getImageWithMD5Hash?SeriesInstanceUID={uid}", ""),
        ("GET", "v1/getSingleImage?SeriesInstanceUID={uid}&SOPInstanceUID={sop}", ""),
        ("GET", "v2/getSingleImage?SeriesInstanceUID={uid}&SOPInstanceUID={sop}", ""),
        ("POST", "getThumbnail", "seriesUID={uid}&objectUID={sop}"),
    ],
)
def test_the_second_download_costs_tcia_nothing_in_every_generation(
    gw: GatewayServer, nbia_upstream: FakeServer, method: str, path: str, body: str
) -> None:
    uid, sop = series_and_image(nbia_upstream)
    url = f"{gw.url}{S}/{path.format(uid=uid, sop=sop)}"
    content = body.format(uid=uid, sop=sop)

    def fetch() -> httpx.Response:
        headers = FORM if method == "POST" else {}
        return httpx.request(method, url, content=content or None, headers=headers, timeout=60)

    first = fetch()
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    before = len(nbia_upstream.app.requests)
    second = fetch()
    assert len(nbia_upstream.app.requests) == before
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert second.content == first.content
    assert second.headers["content-type"] == first.headers["content-type"]
    assert second.headers["content-length"] == str(len(first.content))
    assert len(kept_files(gw)) == 1


def test_request_variants_are_kept_apart_and_each_served_its_own_bytes(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid, _ = series_and_image(nbia_upstream)
    # The series first in each query: what tells them apart comes after it.
    variants = ["", "&NewFileNames=Yes", "&IncludeMD5=yes"]
    paths = [f"{S}/v4/getImage?SeriesInstanceUID={uid}{extra}" for extra in variants]
    firsts = [httpx.get(gw.url + path, timeout=60) for path in paths]
    assert [f.headers["x-cache"] for f in firsts] == ["MISS"] * 3
    assert len(nbia_upstream.app.requests_to("/v4/getImage")) == 3
    names = [zipfile.ZipFile(io.BytesIO(f.content)).namelist() for f in firsts]
    assert len({tuple(n) for n in names}) == 3  # three different zips
    assert "md5hashes.csv" in names[2] and "md5hashes.csv" not in names[0]
    again = [httpx.get(gw.url + path, timeout=60) for path in paths]
    assert [a.headers["x-cache"] for a in again] == ["HIT"] * 3
    assert [a.content for a in again] == [f.content for f in firsts]
    assert len(nbia_upstream.app.requests_to("/v4/getImage")) == 3
    assert len(kept_files(gw)) == 3

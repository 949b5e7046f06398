"""getDCMImage, getImageOther and WADO (v1 ``wado`` GET, v1/root ``getWado`` form POST) through
the series cache end to end, over real sockets, as tests/test_series_cache.py does for getImage.

Each is kept after its first download and then costs NBIA nothing, online and ``--offline``; an
answer its check refuses (a zip NBIA closed short, an image with other bytes than NBIA lists, a
JPEG without its end) aborts the client's transfer, keeps nothing and is fetched again next
time. WADO answers what ``contentType`` asks, so a JPEG is checked as a JPEG and a DICOM file as
DICOM; without one known type the answer is relayed, never kept.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from proxy.binary.imagecheck import DicomCheck, JpegCheck
from proxy.binary.serving import _check_for
from proxy.cache.policy import pairs
from proxy.endpoints import lookup
from tests.fake_nbia import FakeNBIA, FakeServer
from tests.gateway_server import GatewayFactory, GatewayServer
from tests.test_kept_downloads import kept_files

S = "/nbia-api/services/"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
WADO = "requestType=WADO&studyUID={study}&seriesUID={uid}&objectUID={sop}"
AS_DICOM, AS_JPEG = "&contentType=application/dicom", "&contentType=image/jpeg"


@dataclass(frozen=True)
class Ask:
    """One download: ``params`` is the query (GET) or the form (POST), naming the series,
    study and image as ``{uid}``, ``{study}``, ``{sop}``."""

    method: str
    path: str  # below /nbia-api/services/
    params: str

    def send(self, server: GatewayServer, fake: FakeNBIA) -> httpx.Response:
        uid = next(s for s in fake.dataset.series if s.collection == "4D-Lung").uid
        series = fake.dataset.find_series(uid)
        assert series is not None
        sop = fake.images.instances(uid)[0].sop_uid
        params = self.params.format(uid=uid, study=series.study_uid, sop=sop)
        url = server.url + S + self.path
        if self.method == "POST":
            return httpx.post(url, content=params, headers=FORM, timeout=60)
        return httpx.get(f"{url}?{params}", timeout=60)

    def requests(self, fake: FakeNBIA) -> int:
        """How many of these NBIA has answered."""
        return len(fake.requests_to(S + self.path))


DCM_MD5 = Ask("GET", "v4/getDCMImage", "SeriesInstanceUID={uid}&MD5Verification=yes")
ZIPS = {
    "v1-getDCMImage": Ask("GET", "v1/getDCMImage", "SeriesInstanceUID={uid}"),
    "v2-getDCMImage": Ask("GET", "v2/getDCMImage", "SeriesInstanceUID={uid}"),
    "v4-getDCMImage": Ask("GET", "v4/getDCMImage", "SeriesInstanceUID={uid}"),
    "v4-getDCMImage-md5": DCM_MD5,
    "v1-getImageOther": Ask("GET", "v1/getImageOther", "SeriesInstanceUID={uid}"),
    "v4-getImageOther": Ask("GET", "v4/getImageOther", "SeriesInstanceUID={uid}"),
}
DICOMS = {
    "v1-wado-dicom": Ask("GET", "v1/wado", WADO + AS_DICOM),
    "v1-getWado-dicom": Ask("POST", "v1/getWado", WADO + AS_DICOM),
    "root-getWado-dicom": Ask("POST", "getWado", WADO + AS_DICOM),
}
JPEGS = {
    "v1-wado-jpeg": Ask("GET", "v1/wado", WADO + AS_JPEG),
    "v1-getWado-jpeg": Ask("POST", "v1/getWado", WADO + AS_JPEG),
    "root-getWado-jpeg": Ask("POST", "getWado", WADO + AS_JPEG),
}
ALL = {**ZIPS, **DICOMS, **JPEGS}


def is_whole(answer: httpx.Response) -> bool:
    """The answer is the kind its Content-Type says, and complete."""
    body, kind = answer.content, answer.headers["content-type"]
    if kind == "image/jpeg":
        return body[:2] == b"\xff\xd8" and body[-2:] == b"\xff\xd9"
    if kind == "application/dicom":
        return body[128:132] == b"DICM"
    return zipfile.ZipFile(io.BytesIO(body)).testzip() is None


_SAME = ("content-type", "content-disposition")


@pytest.mark.parametrize("ask", ALL.values(), ids=ALL.keys())
def test_kept_after_the_first_download_then_served_without_nbia_and_offline(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, ask: Ask
) -> None:
    fake = nbia_upstream.app
    with make_gateway() as gw:
        first = ask.send(gw, fake)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        assert is_whole(first)
        before = len(fake.requests)
        second = ask.send(gw, fake)
        assert len(fake.requests) == before  # nothing at all upstream
        assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
        assert second.content == first.content
        assert {h: second.headers.get(h) for h in _SAME} == {h: first.headers.get(h) for h in _SAME}
        assert second.headers["content-length"] == str(len(first.content))
        assert len(kept_files(gw)) == 1
    with make_gateway(offline=True) as offline:
        served = ask.send(offline, fake)
        assert (served.headers["x-cache"], served.content) == ("HIT", first.content)
    assert len(fake.requests) == before


Fault = Callable[[FakeNBIA], None]


def _short_zip(fake: FakeNBIA) -> None:
    fake.close_zip_after(1, times=1)


def _short_zip_without_numbers(fake: FakeNBIA) -> None:
    fake.fail_next(100, 500, path_contains="getSeriesSize")  # retries too: no ObjectCount
    fake.close_zip_after(1, times=1)


def _altered_image(fake: FakeNBIA) -> None:
    fake.alter_image(1, times=1)


def _cut_image(fake: FakeNBIA) -> None:
    fake.cut_body_next(1, 200, path_contains="ado")  # wado, getWado: the image breaks off


# An altered image is caught only where NBIA lists its MD5 (md5hashes.csv) or where the change
# breaks the format (a JPEG's end marker); a DICOM file that breaks off is caught by its length.
BAD = [
    *((ask, _short_zip) for ask in ZIPS.values()),
    (DCM_MD5, _short_zip_without_numbers),  # asked for: md5hashes.csv missing gives it away
    (DCM_MD5, _altered_image),
    *((ask, _altered_image) for ask in JPEGS.values()),
    *((ask, _cut_image) for ask in DICOMS.values()),
]
BAD_IDS = [
    *(f"{name}-short" for name in ZIPS),
    "v4-getDCMImage-md5-short-without-numbers",
    "v4-getDCMImage-md5-altered",
    *(f"{name}-altered" for name in JPEGS),
    *(f"{name}-cut" for name in DICOMS),
]


@pytest.mark.parametrize(("ask", "fault"), BAD, ids=BAD_IDS)
def test_a_bad_answer_aborts_the_transfer_keeps_nothing_and_is_fetched_again(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, ask: Ask, fault: Fault
) -> None:
    fake = nbia_upstream.app
    with make_gateway() as gw:
        fault(fake)
        with pytest.raises(httpx.HTTPError):
            ask.send(gw, fake)
        assert kept_files(gw) == []
        good = ask.send(gw, fake)
        assert good.status_code == 200 and is_whole(good)
        again = ask.send(gw, fake)
        assert (again.headers["x-cache"], again.content) == ("HIT", good.content)
        assert ask.requests(fake) == 2
        assert len(kept_files(gw)) == 1


@pytest.mark.parametrize("extra", ["", "&contenttype=image/jpeg"], ids=["absent", "misspelt"])
def test_wado_without_a_known_content_type_is_relayed_and_not_kept(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, extra: str
) -> None:
    fake = nbia_upstream.app
    ask = Ask("GET", "v1/wado", WADO + extra)
    with make_gateway() as gw:
        answers = [ask.send(gw, fake) for _ in range(2)]
        assert [a.headers["x-cache"] for a in answers] == ["BYPASS"] * 2
        assert all(is_whole(a) for a in answers)  # NBIA's default: a JPEG, intact
        assert ask.requests(fake) == 2
        assert kept_files(gw) == []


def test_each_variant_is_a_kept_file_of_its_own_and_the_order_of_parameters_is_not(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    fake = nbia_upstream.app
    variants = [
        ZIPS["v4-getDCMImage"],
        DCM_MD5,
        DICOMS["v1-wado-dicom"],
        JPEGS["v1-wado-jpeg"],
        Ask("GET", "v1/wado", WADO + AS_JPEG + "&rows=40"),
        JPEGS["root-getWado-jpeg"],
        Ask("POST", "getWado", WADO + AS_JPEG + "&rows=40"),
    ]
    # the same requests, their parameters in another order
    reordered = [Ask(v.method, v.path, "&".join(reversed(v.params.split("&")))) for v in variants]
    with make_gateway() as gw:
        firsts = [v.send(gw, fake) for v in variants]
        assert [f.headers["x-cache"] for f in firsts] == ["MISS"] * len(variants)
        assert len({f.content for f in firsts[:5]}) == 5  # each its own bytes
        before = len(fake.requests)
        again = [v.send(gw, fake) for v in reordered]
        assert [a.headers["x-cache"] for a in again] == ["HIT"] * len(variants)
        assert [a.content for a in again] == [f.content for f in firsts]
        assert len(fake.requests) == before
        assert len(kept_files(gw)) == len(variants)


@pytest.mark.parametrize(
    ("path", "params", "check"),
    [
        ("v1/wado", "contentType=image/jpeg", JpegCheck),
        ("v1/wado", "contentType=Image/JPEG", JpegCheck),
        ("v1/getWado", "contentType=image/jpeg", JpegCheck),
        ("getWado", "contentType=image/jpeg", JpegCheck),
        ("v1/wado", "contentType=application/dicom", DicomCheck),
        ("getWado", "contentType=application/dicom", DicomCheck),
        ("v1/wado", "", None),
        ("v1/wado", "contentType=image/jpeg,application/dicom", None),
        ("v1/wado", "contentType=image/png", None),
        ("v1/getSingleImage", "", DicomCheck),
    ],
)
def test_the_check_of_a_wado_answer_follows_its_content_type(
    path: str, params: str, check: type | None
) -> None:
    endpoint = lookup(S + path)
    assert endpoint is not None
    made = _check_for(endpoint, pairs(params.encode()))
    assert type(made) is check if check is not None else made is None

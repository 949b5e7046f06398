"""Fidelity: a broad set of real requests gives the same answer through the gateway as direct.

Every endpoint class (counts, metadata, search, CSV, text, manifests, zips, DICOM, JPEG), GET and
form POST, v1/v2/v4/root, both upstreams, and the error answers NBIA gives (empty-body 200,
strict 400, 405, 500). Root and v2 calls made directly carry a token the test obtains itself;
through the gateway they carry the gateway's service token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer

S = "/nbia-api/services"


@dataclass(frozen=True)
class Call:
    """One request; ``{big}``, ``{series}``, ``{sop}``, ``{nlst_series}`` are filled at run time."""

    method: str
    path: str
    form: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    upstream: str = "nbia"

    def __str__(self) -> str:
        return f"{self.upstream}:{self.method} {self.path}"


SERIES_LIST = (("list", "{series},{series2}"),)
SIMPLE_SEARCH = (
    ("criteriaType0", "CollectionCriteria"),
    ("value0", "4D-Lung"),
    ("criteriaType1", "ImageModalityCriteria"),
    ("value1", "CT"),
    ("sortField", "subject"),
    ("sortDirection", "ascending"),
    ("start", "0"),
    ("size", "10"),
    ("tool", "tcia_utils"),
)

CALLS = [
    # v4 GET: lists, counts, metadata, formats, empty answers, strict errors
    Call("GET", f"{S}/v4/getCollectionValues"),
    Call("GET", f"{S}/v4/getCollectionValues?format=csv"),
    Call("GET", f"{S}/v4/getCollectionValues?format=xml"),
    Call("GET", f"{S}/v4/getModalityValues?Collection=4D-Lung"),
    Call("GET", f"{S}/v4/getBodyPartValues?Collection=TCGA-KIRC&Modality=CT"),
    Call("GET", f"{S}/v4/getPatient?Collection=Soft-tissue-Sarcoma"),
    Call("GET", f"{S}/v4/getPatientStudy?Collection=4D-Lung"),
    Call("GET", f"{S}/v4/getSeries?Modality=MR&Collection=TCGA-KIRC"),
    Call("GET", f"{S}/v4/getSeries?Collection=CPTAC-SAR"),
    Call("GET", f"{S}/v4/getSeries?Collection=4D-Lung&foo=bar"),
    Call("GET", f"{S}/v4/getSeries?format=bogus"),
    Call("GET", f"{S}/v4/getSeriesSize?SeriesInstanceUID={{series}}"),
    Call("GET", f"{S}/v4/getSeriesSize"),
    Call("GET", f"{S}/v4/getSOPInstanceUIDs?SeriesInstanceUID={{series}}"),
    Call("GET", f"{S}/v4/getUpdatedSeries?fromDate=01-01-2019"),
    Call("GET", f"{S}/v4/NewPatientsInCollection?Collection=4D-Lung&fromDate=01-01-2000"),
    Call("GET", f"{S}/v4/getCollectionValuesAndCounts"),
    Call("GET", f"{S}/v4/getBodyPartValuesAndCounts?Collection=4D-Lung"),
    Call("GET", f"{S}/v4/getDicomTags?SeriesUID={{series}}"),
    Call("GET", f"{S}/v4/getCollectionDescriptions?collectionName=4D-Lung"),
    # v4 binaries
    Call("GET", f"{S}/v4/getImage?NewFileNames=Yes&SeriesInstanceUID={{series}}"),
    Call("GET", f"{S}/v4/getImage?SeriesInstanceUID={{series}}&IncludeMD5=yes"),
    Call("GET", f"{S}/v4/getImageWithMD5Hash?SeriesInstanceUID={{series}}"),
    Call("GET", f"{S}/v4/getImage?SeriesInstanceUID=1.2.3.999"),
    Call("GET", f"{S}/v4/getSingleImage?SeriesInstanceUID={{series}}&SOPInstanceUID={{sop}}"),
    # v4 form POSTs
    Call("POST", f"{S}/v4/getSeriesMetadata", SERIES_LIST),
    Call("POST", f"{S}/v4/getSeriesMetadata", (("list", "{series}"), ("list", "{series2}"))),
    Call("POST", f"{S}/v4/getSimpleSearch", SIMPLE_SEARCH),
    Call("POST", f"{S}/v4/getManifestForSimpleSearch", SIMPLE_SEARCH),
    Call("POST", f"{S}/v4/getManifestText", SERIES_LIST + (("includeAnnotation", "true"),)),
    Call("POST", f"{S}/v4/getMD5Hierarchy", (("SeriesInstanceUID", "{series}"),)),
    Call("POST", f"{S}/v4/getThumbnail", (("seriesUID", "{series}"), ("objectUID", "{sop}"))),
    Call(
        "POST",
        f"{S}/v4/getCollectionOrSeriesForDOI",
        (("DOI", "10.7937/K9/TCIA.2016.ELN8YGLE"), ("CollectionOrSeries", "collection")),
    ),
    Call("POST", f"{S}/v4/getCollectionValues"),  # GET-only resource: 405
    # v1 (public) and v2 (token)
    Call("GET", f"{S}/v1/getCollectionValues"),
    Call("GET", f"{S}/v1/getSeries?Collection=Soft-tissue-Sarcoma"),
    Call("GET", f"{S}/v1/getContentsByName?name=nbia-49121659384603347"),
    Call("GET", f"{S}/v1/getImage?SeriesInstanceUID={{series}}"),
    Call("GET", f"{S}/v2/getCollectionValues"),
    Call("GET", f"{S}/v2/getSeries?Collection=4D-Lung"),
    Call("GET", f"{S}/v2/getImageWithMD5Hash?SeriesInstanceUID={{series}}"),
    # root "Advanced" (token)
    Call("GET", f"{S}/getCollectionValuesAndCounts"),
    Call("GET", f"{S}/getBodyPartValuesAndCounts?Collection=4D-Lung"),
    Call("POST", f"{S}/getSimpleSearchWithModalityAndBodyPartPaged", SIMPLE_SEARCH),
    Call("POST", f"{S}/getManifestForSimpleSearch", SIMPLE_SEARCH),
    Call("POST", f"{S}/getSeriesMetadata2", SERIES_LIST),
    Call("POST", f"{S}/getMD5Hierarchy", (("Collection", "4D-Lung"),)),
    # NLST, mounted at /nlst on the gateway
    Call("GET", f"{S}/v4/getCollectionValues", upstream="nlst"),
    Call("GET", f"{S}/v4/getSeries?Collection=NLST", upstream="nlst"),
    Call("GET", f"{S}/v4/getImage?SeriesInstanceUID={{nlst_series}}", upstream="nlst"),
    Call("GET", f"{S}/getCollectionValuesAndCounts", upstream="nlst"),
]

_BASKET_ID = re.compile(rb"databasketId=manifest-\d+\.tcia")


def _values(nbia: FakeServer, nlst: FakeServer) -> dict[str, str]:
    series = [s for s in nbia.app.dataset.series if s.collection == "4D-Lung" and not s.big]
    nlst_series = next(s for s in nlst.app.dataset.series if not s.big)
    sops = httpx.get(
        f"{nbia.url}{S}/v4/getSOPInstanceUIDs", params={"SeriesInstanceUID": series[0].uid}
    ).json()
    return {
        "series": series[0].uid,
        "series2": series[1].uid,
        "sop": sops[0]["SOPInstanceUID"],
        "nlst_series": nlst_series.uid,
        "big": nbia.app.big_series_uid,
    }


def _direct_token(upstream: FakeServer) -> str:
    form = {"username": "nbia_guest", "password": "", "client_id": "nbia"}
    form["grant_type"] = "password"
    answer = httpx.post(f"{upstream.url}/nbia-api/oauth/token", data=form)
    return str(answer.json()["access_token"])


def _send(base: str, call: Call, values: dict[str, str], token: str | None) -> httpx.Response:
    path = call.path.format(**values)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if call.method == "GET":
        return httpx.get(base + path, headers=headers, timeout=30)
    # Encoded by hand so that repeated fields (list=a&list=b) keep their order.
    form = httpx.QueryParams([(key, value.format(**values)) for key, value in call.form])
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    return httpx.post(base + path, content=str(form).encode(), headers=headers, timeout=30)


@pytest.mark.parametrize("call", CALLS, ids=str)
def test_same_answer_through_the_gateway(
    call: Call, gateway: GatewayServer, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> None:
    values = _values(nbia_upstream, nlst_upstream)
    upstream = nbia_upstream if call.upstream == "nbia" else nlst_upstream
    needs_token = "/v2/" in call.path or "/v4/" not in call.path and "/v1/" not in call.path
    direct = _send(upstream.url, call, values, _direct_token(upstream) if needs_token else None)
    mount = "" if call.upstream == "nbia" else "/nlst"
    through = _send(gateway.url + mount, call, values, token=None)

    assert through.status_code == direct.status_code
    for header in ("content-type", "content-disposition", "content-encoding"):
        assert through.headers.get(header) == direct.headers.get(header), header
    # Manifests carry a fresh basket id (epoch millis) on every call; the rest is identical.
    assert _BASKET_ID.sub(b"", through.content) == _BASKET_ID.sub(b"", direct.content)
    assert through.content or direct.status_code == 200  # empty bodies only as NBIA's 200


def test_query_order_and_form_bytes_reach_the_upstream_unchanged(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """NBIA v4 rejects unexpected parameters, so the gateway adds, drops and reorders none."""
    query = "Modality=CT&Collection=4D-Lung&format=json"
    httpx.get(f"{gateway.url}{S}/v4/getSeries?{query}")
    body = b"list=1.2.3%2C4.5.6&list=7.8.9&format=csv"
    httpx.post(
        f"{gateway.url}{S}/v4/getSeriesMetadata",
        content=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    (get,) = nbia_upstream.app.requests_to("/v4/getSeries")
    (post,) = nbia_upstream.app.requests_to("/v4/getSeriesMetadata")
    assert get.query == query
    assert post.body == body
    assert post.headers["content-type"] == "application/x-www-form-urlencoded; charset=UTF-8"


def test_empty_result_is_an_empty_200(gateway: GatewayServer, nbia_upstream: FakeServer) -> None:
    """NBIA's "no results" is a 200 with no body; the gateway must not turn it into `[]`."""
    response = httpx.get(f"{gateway.url}{S}/v4/getSeries?Collection=CPTAC-SAR")
    assert response.status_code == 200
    assert response.content == b""

"""The gateway against NBIA's documented answers, replayed with vcrpy from hand-made cassettes.

Each cassette in ``tests/cassettes/`` holds one documented exchange (nbia-api.md §4 and the
NBIA guide in ``shared/seeds``); none was recorded. The gateway runs for real (uvicorn in a
thread) in front of the default upstream ``https://services.cancerimagingarchive.net``; vcrpy
patches httpx in every thread, so the gateway's upstream calls are answered from the cassette
and the test's own calls to 127.0.0.1 go through (``ignore_localhost``). The client must get
the documented status, headers and exact bytes, and the upstream must see exactly the
client's request, plus the service token where NBIA needs one.

vcrpy details that matter here (vcrpy 9.x, httpx 0.28):

* vcrpy's ``body`` matcher parses a form body with ``parse_qs`` when the request is typed
  ``application/x-www-form-urlencoded``: blank values (``password=``) vanish and pair order is
  ignored, so a re-encoded or reordered form would still match. The cassettes are therefore
  matched with ``raw_body`` (exact bytes), and an empty GET body is written ``body: ''``
  (httpx sends ``b""``; a missing body would load as ``None`` and never match).
* vcrpy's ``query`` matcher compares sorted pairs, so query order is checked separately, on
  the raw request target the upstream received (:func:`upstream_log`).
* Binary endpoints go through ``proxy.rawhttp`` (a raw socket client vcrpy cannot see), so
  only text payloads are covered here.
* vcrpy answers from the cassette in place of httpx's own transports only, so here the
  gateway's upstream clients get httpx's transport instead of :mod:`proxy.http1` (whose bytes
  on the wire, the ``httpx.Request`` as it is, ``tests/test_http1.py`` checks).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import vcr
import yaml
from vcr.persisters.filesystem import FilesystemPersister

import proxy.upstream
from tests import reference
from tests.gateway_server import GatewayServer, make_settings

CASSETTES = Path(__file__).parent / "cassettes"


@pytest.fixture(scope="module", autouse=True)
def _httpx_transport() -> Iterator[None]:
    """The upstream clients on httpx's own transport, the one vcrpy replays cassettes into."""

    def transport(
        max_connections: int, ssl_context: ssl.SSLContext | None = None
    ) -> httpx.AsyncHTTPTransport:
        limits = httpx.Limits(max_connections=max_connections)
        return httpx.AsyncHTTPTransport(limits=limits, verify=ssl_context or True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(proxy.upstream, "Http1Transport", transport)
        yield


UPSTREAM = "https://services.cancerimagingarchive.net"
TOKEN_CASSETTE = CASSETTES / "token_password_grant.yaml"
CATALOG = reference.CATALOG
SEED = reference.GUIDE

FORM = "application/x-www-form-urlencoded"
CLIENT_AUTHORIZATION = "Bearer client-token-that-must-stay-here"
# The gateway's own login, as NBIA documents it (guide L114; client_id as configured).
LOGIN_FORM = b"username=nbia_guest&password=&client_id=nbia&grant_type=password"


def _sample_access_token() -> str:
    """The access_token of the token sample the cassette answers the gateway's login with."""
    data = yaml.safe_load(TOKEN_CASSETTE.read_text())
    body = data["interactions"][0]["response"]["body"]["string"]
    match = re.search(r'"access_token":"([^"]+)"', body)
    assert match is not None
    return match.group(1)


SERVICE_AUTHORIZATION = "Bearer " + _sample_access_token()


@dataclass(frozen=True)
class Case:
    """One documented exchange: what the client sends and what it must get back."""

    cassette: str
    method: str
    target: str  # path and query below the gateway's base URL, exactly as sent
    body: bytes = b""
    status: int = 200
    content_type: str | None = "application/json"
    disposition: str | None = None
    token: bool = True  # root and v2 need the service token; v4 (default) and v1 do not

    @property
    def id(self) -> str:
        return self.cassette


CASES = [
    Case(
        "root_getBodyPartValuesAndCounts",
        "GET",
        "/nbia-api/services/getBodyPartValuesAndCounts?Modality=PT",
    ),
    Case(
        "v4_getSeries",
        "GET",
        "/nbia-api/services/v4/getSeries?PatientID=STS_010&Collection=Soft-tissue-Sarcoma&Modality=MR",
        token=False,
    ),
    Case(
        "v2_getUpdatedSeries", "GET", "/nbia-api/services/v2/getUpdatedSeries?fromDate=01/01/2020"
    ),
    Case(
        "root_getDicomTags",
        "GET",
        "/nbia-api/services/getDicomTags?SeriesUID=9999.266036705757333804188405684898037929022",
    ),
    Case(
        "root_getCollectionOrSeriesForDOI",
        "POST",
        "/nbia-api/services/getCollectionOrSeriesForDOI",
        b"DOI=https://doifor-CBIS-DDSM&CollectionOrSeries=collection",
    ),
    Case("root_getSpeciesTax", "GET", "/nbia-api/services/getSpeciesTax"),
    Case(
        "root_getSimpleSearchWithModalityAndBodyPartPaged",
        "POST",
        "/nbia-api/services/getSimpleSearchWithModalityAndBodyPartPaged",
        b"criteriaType0=TimePointCriteria&eventType0=DIAGNOSIS&fromDay0=-5&toDay0=10"
        b"&sortField=subject&sortDirection=descending&start=0&size=9",
    ),
    Case("root_getTextSearch", "POST", "/nbia-api/services/getTextSearch", b"textValue=lung"),
    Case(
        "root_getManifestForSimpleSearch",
        "POST",
        "/nbia-api/services/getManifestForSimpleSearch",
        b"criteriaType0=ThirdPartyAnalysis&value0=yes&sortField=subject"
        b"&sortDirection=descending&start=0&size=1000000",
        content_type="application/x-nbia-manifest-file",
    ),
    Case(
        "root_getSeriesMetadata2",
        "POST",
        "/nbia-api/services/getSeriesMetadata2",
        b"list=9999.293545899757968087866143572947417050996,"
        b"9999.172212451609088872857235914630319746611",
        content_type="text/csv",
        disposition='attachment; filename="SeriesMetaData.csv"',
    ),
    Case(
        "root_getMD5Hierarchy",
        "POST",
        "/nbia-api/services/getMD5Hierarchy",
        b"Collection=LIDC",
        content_type="text/plain",
    ),
    Case(
        "v4_empty_result",
        "GET",
        "/nbia-api/services/v4/getPatient?Collection=NoSuchCollection",
        content_type=None,
        token=False,
    ),
    Case(
        "v4_strict_400",
        "GET",
        "/nbia-api/services/v4/getModalityValues?Collection=LIDC&foo=bar",
        status=400,
        token=False,
    ),
    Case("v1_getCollectionValues", "GET", "/nbia-api/services/v1/getCollectionValues", token=False),
]


class _WithTokenPersister(FilesystemPersister):
    """Loads the token cassette in front of each sample cassette; never writes anything.

    The gateway logs in before its first root/v2 call, so every exchange may need the token
    interaction; keeping it in one file keeps the sample cassettes to one exchange each.
    """

    @classmethod
    def load_cassette(cls, cassette_path: Any, serializer: Any) -> Any:
        token_requests, token_responses = FilesystemPersister.load_cassette(
            TOKEN_CASSETTE, serializer
        )
        requests, responses = FilesystemPersister.load_cassette(cassette_path, serializer)
        return token_requests + requests, token_responses + responses

    @staticmethod
    def save_cassette(cassette_path: Any, cassette_dict: Any, serializer: Any) -> None:
        raise AssertionError(f"hand-made cassettes are never rewritten ({cassette_path})")


def _replayer() -> vcr.VCR:
    replayer = vcr.VCR(
        cassette_library_dir=str(CASSETTES),
        record_mode="none",
        match_on=["method", "scheme", "host", "port", "path", "query", "raw_body"],
        ignore_localhost=True,
    )
    replayer.register_persister(_WithTokenPersister)
    return replayer


@dataclass(frozen=True)
class SeenRequest:
    """A request as the gateway handed it to httpx for the upstream."""

    method: str
    url: httpx.URL
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def target(self) -> bytes:
        """The request target on the wire: path and query, bytes and order as sent."""
        return self.url.raw_path

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name]


@contextmanager
def upstream_log() -> Iterator[list[SeenRequest]]:
    """Record every request the gateway sends upstream, once each, exactly as sent.

    Wraps the (vcrpy-patched) async httpx transport; vcrpy's own request hooks run several
    times per request on deep copies, which is no good for counting. Must be entered inside
    the cassette so that leaving it restores vcrpy's patch, not the original method.
    """
    seen: list[SeenRequest] = []
    patched = httpx.AsyncHTTPTransport.handle_async_request

    async def recording(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        seen.append(
            SeenRequest(
                request.method,
                request.url,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                request.content,
            )
        )
        return await patched(self, request)

    httpx.AsyncHTTPTransport.handle_async_request = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        httpx.AsyncHTTPTransport.handle_async_request = patched  # type: ignore[method-assign]


def _recorded_body(case: Case) -> bytes:
    """The documented answer body, straight from the cassette file."""
    data = yaml.safe_load((CASSETTES / f"{case.cassette}.yaml").read_text())
    return data["interactions"][-1]["response"]["body"]["string"].encode("utf-8")


def _client_headers(case: Case) -> dict[str, str]:
    headers = {"Authorization": CLIENT_AUTHORIZATION, "Cookie": "JSESSIONID=client-session"}
    if case.method == "POST":
        headers["Content-Type"] = FORM  # what curl -d (and every NBIA client) sends
    return headers


def _exchange(
    tmp_path: Path, case: Case, **settings: Any
) -> tuple[httpx.Response, list[SeenRequest], Any]:
    """Send ``case`` through a fresh gateway; return the answer, the upstream log, the cassette."""
    gateway_settings = make_settings(tmp_path, UPSTREAM, **settings)
    with GatewayServer(gateway_settings) as gateway:
        with _replayer().use_cassette(f"{case.cassette}.yaml") as cassette, upstream_log() as seen:
            with httpx.Client(base_url=gateway.url, timeout=10) as client:
                response = client.request(
                    case.method,
                    case.target,
                    content=case.body or None,
                    headers=_client_headers(case),
                )
                response.read()
    return response, seen, cassette


@dataclass(frozen=True)
class Exchange:
    """One case sent through its own gateway: the client's answer and what went upstream."""

    case: Case
    response: httpx.Response
    seen: list[SeenRequest]
    play_count: int

    def only(self, path_prefix: str) -> list[SeenRequest]:
        return [s for s in self.seen if s.url.path.startswith(path_prefix)]


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def exchange(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exchange:
    """Each case is sent once (a gateway start and stop costs ~0.3 s); tests share the result."""
    case: Case = request.param
    response, seen, cassette = _exchange(tmp_path_factory.mktemp(case.cassette), case)
    return Exchange(case, response, seen, cassette.play_count)


def test_client_gets_the_documented_answer(exchange: Exchange) -> None:
    """Status, Content-Type, Content-Disposition and body bytes reach the client unchanged."""
    case, response = exchange.case, exchange.response
    expected = _recorded_body(case)
    assert response.status_code == case.status, response.text
    assert response.headers.get("content-type") == case.content_type
    assert response.headers.get("content-disposition") == case.disposition
    assert response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    assert SERVICE_AUTHORIZATION.split()[1] not in str(response.headers.raw)  # stays upstream
    assert exchange.play_count == (2 if case.token else 1)


def test_upstream_sees_the_client_request_exactly(exchange: Exchange) -> None:
    """Method, path, query (bytes and order) and form body go upstream unchanged; the client's
    credentials do not; root and v2 calls carry the service token from one documented login,
    v4 and v1 calls carry none and cause no login."""
    case = exchange.case
    assert exchange.response.status_code == case.status, exchange.response.text
    calls = exchange.only("/nbia-api/services/")
    logins = exchange.only("/nbia-api/oauth/token")
    assert len(calls) == 1 and len(calls) + len(logins) == len(exchange.seen)
    (call,) = calls
    assert call.method == case.method
    assert (call.url.scheme, call.url.host, call.url.port) == (
        "https",
        "services.cancerimagingarchive.net",
        None,
    )
    assert call.target == case.target.encode("ascii")
    assert call.body == case.body
    if case.method == "POST":
        assert call.header_values("content-type") == [FORM]
    assert call.header_values("cookie") == []
    assert CLIENT_AUTHORIZATION not in call.header_values("authorization")
    if case.token:
        assert call.header_values("authorization") == [SERVICE_AUTHORIZATION]
        # One login first: NBIA's password grant for the guest, as a form, without credentials.
        assert exchange.seen == [*logins, call] and len(logins) == 1
        login = logins[0]
        assert (login.method, str(login.url)) == ("POST", UPSTREAM + "/nbia-api/oauth/token")
        assert login.body == LOGIN_FORM
        assert login.header_values("content-type") == [FORM]
        assert login.header_values("authorization") == []
    else:
        assert call.header_values("authorization") == []
        assert logins == []


def test_token_on_v4_sends_the_service_token_to_v4(tmp_path: Path) -> None:
    """With token_on_v4 the v4 call carries the service token (catalog §1.2: optional on v4)."""
    case = next(c for c in CASES if c.cassette == "v4_getSeries")
    response, seen, _ = _exchange(tmp_path, case, token_on_v4=True)
    assert response.status_code == 200
    (call,) = [s for s in seen if s.url.path.startswith("/nbia-api/services/")]
    assert call.header_values("authorization") == [SERVICE_AUTHORIZATION]


def test_unmatched_request_is_not_answered_from_the_cassette(tmp_path: Path) -> None:
    """Control: a request the cassette does not hold (other query) gets no documented body,
    so the matching above really depends on the request the gateway sends."""
    case = next(c for c in CASES if c.cassette == "v4_getSeries")
    other = Case(case.cassette, "GET", case.target.replace("Modality=MR", "Modality=CT"))
    response, seen, cassette = _exchange(tmp_path, other)
    assert response.status_code >= 500
    assert response.content != _recorded_body(case)
    assert cassette.play_count == 0
    assert len(seen) == 1


def _documents() -> str:
    return CATALOG.read_text(encoding="utf-8") + SEED.read_text(encoding="utf-8")


# The 400's parameter list is filled in from §2.1; the documented sample elides it.
_DOCUMENTED_PREFIX = {"v4_strict_400": "Invalid query parameter: 'foo'. Allowed parameters are: ["}


@pytest.mark.parametrize(
    "name",
    # The empty-body cassette has no text to trace; test_client_gets_the_documented_answer
    # covers it.
    sorted(p.stem for p in CASSETTES.glob("*.yaml") if p.stem != "v4_empty_result"),
)
def test_cassette_bodies_come_from_the_documentation(name: str) -> None:
    """Every line of every cassette answer is text from the catalog or the NBIA guide."""
    documents = _documents()
    data = yaml.safe_load((CASSETTES / f"{name}.yaml").read_text())
    for interaction in data["interactions"]:
        body = interaction["response"]["body"]["string"]
        if name in _DOCUMENTED_PREFIX:
            assert body.startswith(_DOCUMENTED_PREFIX[name])
            assert _DOCUMENTED_PREFIX[name] in documents
            continue
        for line in filter(None, (line.strip() for line in body.splitlines())):
            assert line in documents, f"{name}: undocumented line {line!r}"

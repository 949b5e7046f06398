"""Failures become short JSON answers with the right status, within the configured time limits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings, request_line, send_raw

V4_LIST = "/nbia-api/services/v4/getCollectionValues"


def _zip(fake: FakeServer) -> str:
    return f"/nbia-api/services/v4/getImage?SeriesInstanceUID={fake.app.big_series_uid}"


@pytest.fixture
def quick_gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> Iterator[GatewayServer]:
    """A gateway with short upstream time limits."""
    settings = make_settings(
        tmp_path,
        nbia_upstream.url,
        nlst_upstream.url,
        connect_timeout_seconds=1.0,
        read_timeout_seconds=0.5,
        max_request_body_bytes=64 * 1024,
        retry_max_attempts=0,  # what the upstream says reaches the client as is
    )
    with GatewayServer(settings) as server:
        yield server


def _assert_gateway_error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert len(response.content) < 300
    # The gateway's own answers say so like every other: never cached, no age.
    assert (response.headers["x-cache"], response.headers["age"]) == ("BYPASS", "0")
    return body


def _stop(fake: FakeServer) -> None:
    fake.stop()


def _slow(fake: FakeServer) -> None:
    fake.app.slow(seconds_before_headers=3.0)


@pytest.mark.parametrize("kind", ["metadata", "binary"])
@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        pytest.param(_stop, 502, "refused the connection", id="down-502"),
        pytest.param(_slow, 504, "did not answer within 0.5 s", id="slow-504-within-read-timeout"),
    ],
)
def test_upstream_down_or_slow_is_a_fast_gateway_error(
    quick_gateway: GatewayServer,
    nbia_upstream: FakeServer,
    kind: str,
    fault: Callable[[FakeServer], None],
    status: int,
    error: str,
) -> None:
    path = V4_LIST if kind == "metadata" else _zip(nbia_upstream)
    fault(nbia_upstream)
    # No clock here: the client's own timeout (10 s) would raise if the gateway hung, and the
    # body names what ended the wait (a refusal, or the 0.5 s read timeout).
    response = httpx.get(quick_gateway.url + path, timeout=10)
    body = _assert_gateway_error(response, status)
    assert body == {"error": f"upstream 127.0.0.1:{nbia_upstream.port} {error}", "upstream": "nbia"}


@pytest.mark.parametrize("kind", ["metadata", "binary"])
def test_connection_dropped_without_answer_is_a_502(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer, kind: str
) -> None:
    path = V4_LIST if kind == "metadata" else _zip(nbia_upstream)
    # A metadata read whose pooled connection breaks is sent once more, so it takes two drops;
    # binaries go out on a fresh connection each and are never re-sent.
    nbia_upstream.app.drop_connection_next(2 if kind == "metadata" else 1)
    _assert_gateway_error(httpx.get(quick_gateway.url + path, timeout=10), 502)
    # The next request is fine again.
    assert httpx.get(quick_gateway.url + path, timeout=10).status_code == 200


def test_upstream_error_statuses_pass_through_unchanged(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """An upstream 500 or 429 is NBIA's answer: relayed as is, body and Retry-After included."""
    fake = nbia_upstream.app
    fake.fail_next(1, status=500)
    direct_500 = httpx.get(nbia_upstream.url + V4_LIST)
    fake.fail_next(1, status=500)
    through = httpx.get(quick_gateway.url + V4_LIST)
    assert (through.status_code, through.content) == (500, direct_500.content)
    fake.fail_next(1, status=429, retry_after=7)
    limited = httpx.get(quick_gateway.url + V4_LIST)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"


def test_oversized_body_is_a_413(quick_gateway: GatewayServer, nbia_upstream: FakeServer) -> None:
    form = {"list": ",".join(["1.2.3.4.5.6.7.8.9"] * 10_000)}  # about 180 KB > the 64 KB limit
    response = httpx.post(quick_gateway.url + "/nbia-api/services/v4/getSeriesMetadata", data=form)
    _assert_gateway_error(response, 413)
    assert nbia_upstream.app.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/nbia-api/services/v4/../../../etc/passwd",
        "/nbia-api/services/./v4/getCollectionValues",
        "/nlst/nbia-api/services/v1/../v4/getSeries",
    ],
)
def test_dot_segments_are_refused(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer, target: str
) -> None:
    status, _, body = send_raw(quick_gateway.url, request_line("GET", target))
    assert status == 400
    assert b"dot segments" in body
    assert nbia_upstream.app.requests == []


def test_unknown_gateway_path_is_a_json_404(quick_gateway: GatewayServer) -> None:
    response = httpx.get(quick_gateway.url + "/no/such/thing")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


def test_unknown_nbia_endpoint_is_forwarded(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """NBIA keeps adding endpoints: ones missing from the table still reach the upstream."""
    path = "/nbia-api/services/v4/getSomethingNew?Collection=X"
    direct = httpx.get(nbia_upstream.url + path)
    through = httpx.get(quick_gateway.url + path)
    assert (through.status_code, through.content) == (direct.status_code, direct.content)
    assert len(nbia_upstream.app.requests_to("/v4/getSomethingNew")) == 2


def test_hop_by_hop_request_headers_are_dropped(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    headers = {
        "Connection": "keep-alive, X-Hop-Only",
        "X-Hop-Only": "1",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "JSESSIONID=abc",
        "X-End-To-End": "2",
        "Accept": "application/json",
    }
    httpx.get(quick_gateway.url + V4_LIST, headers=headers)
    (seen,) = nbia_upstream.app.requests_to("/v4/getCollectionValues")
    for dropped in ("x-hop-only", "te", "proxy-authorization", "cookie"):
        assert dropped not in seen.headers
    assert "x-hop-only" not in seen.headers.get("connection", "").lower()
    assert seen.headers["x-end-to-end"] == "2"
    assert seen.headers["accept"] == "application/json"


@pytest.mark.parametrize(
    "path",
    [
        "/nbia-api/oauth/token/",
        "/nbia-api//oauth/token",
        "/nbia-api/services/oauth/token/",
        "/nbia-api/OAuth/Token",
        "/nlst/nbia-api/oauth//token",
    ],
)
def test_token_path_variants_are_answered_locally(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer, nlst_upstream: FakeServer, path: str
) -> None:
    """Spellings a servlet container maps to the token endpoint never carry credentials out."""
    form = {"username": "alice", "password": "s3cret-pw", "grant_type": "password"}
    answer = httpx.post(quick_gateway.url + path, data=form)
    assert answer.status_code == 200 and answer.json()["token_type"] == "Bearer"
    assert nbia_upstream.app.requests == [] and nlst_upstream.app.requests == []


def test_expect_100_continue_is_not_forwarded(
    quick_gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    uid = next(s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung")
    sops = httpx.get(
        f"{nbia_upstream.url}/nbia-api/services/v4/getSOPInstanceUIDs",
        params={"SeriesInstanceUID": uid},
    ).json()
    form = {"seriesUID": uid, "objectUID": sops[0]["SOPInstanceUID"]}
    answer = httpx.post(
        quick_gateway.url + "/nbia-api/services/v4/getThumbnail",
        data=form,
        headers={"Expect": "100-continue"},
    )
    assert answer.status_code == 200 and answer.content.startswith(b"\xff\xd8")
    (seen,) = nbia_upstream.app.requests_to("/v4/getThumbnail")
    assert "expect" not in seen.headers


def test_encoded_slash_after_the_mount_is_a_400_not_a_500(
    quick_gateway: GatewayServer, nlst_upstream: FakeServer
) -> None:
    status, _, body = send_raw(
        quick_gateway.url, request_line("GET", "/nlst%2Fnbia-api/services/v1/getCollectionValues")
    )
    assert status == 400 and b"malformed" in body
    assert nlst_upstream.app.requests == []

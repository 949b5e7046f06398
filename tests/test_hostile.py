"""Hostile input: SSRF attempts and generated malformed requests.

Requests are written by hand on a raw socket, because HTTP clients normalise away exactly the
things being tested (dot segments, absolute-form targets, odd bytes). A decoy listener stands
where an attacker would like the gateway to connect; it must never see a connection.
"""

from __future__ import annotations

import socket
import string
import threading
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, request_line, send_raw

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


class Decoy:
    """A listener that counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._running = True
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while self._running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def decoy() -> Iterator[Decoy]:
    listener = Decoy()
    yield listener
    listener.close()


def test_ssrf_attempts_never_reach_another_host(
    gateway: GatewayServer, nbia_upstream: FakeServer, decoy: Decoy
) -> None:
    evil = f"127.0.0.1:{decoy.port}"
    attempts = [
        request_line("GET", f"http://{evil}{S}/v4/getCollectionValues"),
        request_line("GET", f"{S}/v4/getCollectionValues", host=evil),
        request_line("GET", f"//{evil}{S}/v4/getCollectionValues"),
        request_line("GET", f"/nbia-api//{evil}/services/v4/getCollectionValues"),
        request_line("GET", f"/nbia-api/@{evil}/services/v4/getCollectionValues"),
        request_line("GET", f"{S}/v4/..%2F..%2F..%2F{evil}"),
        request_line("GET", f"{S}/v4/getSeries?Collection=http://{evil}/"),
        request_line("GET", f"/nlst/..{S}/v4/getCollectionValues"),
        request_line("GET", f"{S}/v4/getCollectionValues", extra=f"X-Forwarded-Host: {evil}\r\n"),
        request_line("CONNECT", evil, host=evil),
    ]
    for attempt in attempts:
        status, _, _ = send_raw(gateway.url, attempt)
        assert status == 0 or status < 500 or status in (502, 504), attempt
    # Paths naming the decoy may reach the configured upstream (as a path); the decoy nothing.
    assert decoy.connections == 0


METHODS = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
SEGMENT = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@",
    min_size=0,
    max_size=20,
)
ODD_BYTES = st.binary(min_size=0, max_size=40).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """Malformed or odd requests aimed at the NBIA paths and the gateway's own."""
    prefix = draw(st.sampled_from([f"{S}/v4/", f"{S}/", "/nlst/nbia-api/", "/_proxy/", "/"]))
    path = prefix + "/".join(draw(st.lists(SEGMENT, max_size=4)))
    query = draw(st.one_of(st.just(""), SEGMENT.map(lambda q: "?" + q)))
    head = f"{draw(METHODS)} ".encode() + path.encode() + query.encode() + draw(ODD_BYTES)
    head += b" HTTP/1.1\r\nHost: gateway\r\n"
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12))
        head += name.encode() + b": " + draw(ODD_BYTES) + b"\r\n"
    body = draw(st.binary(max_size=200))
    if body:
        head += b"Content-Type: application/x-www-form-urlencoded\r\n"
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    return head + body


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=hostile_requests())
def test_generated_malformed_requests_never_break_the_gateway(
    gateway: GatewayServer, nbia_upstream: FakeServer, decoy: Decoy, request: bytes
) -> None:
    """No gateway-made 5xx, no hang, and no stack trace, whatever arrives."""
    status, _, body = send_raw(gateway.url, request)
    assert b"Traceback" not in body and b"internal gateway error" not in body
    if status >= 500:
        # Only the upstream's own answers, or the gateway's clear upstream errors.
        assert status in (500, 502, 504), body
        assert b"upstream" in body or b"Server was not" in body, body


def test_after_the_onslaught_the_gateway_is_healthy_and_the_cache_intact(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    warm = httpx.get(gateway.url + SERIES)
    for method in ("GET", "POST", "BREW"):
        for target in (f"{S}/v4/getSeries?Collection=%ff%fe", f"{S}/v4/\x7fbad", "/_proxy/../x"):
            send_raw(gateway.url, request_line(method, target))
        send_raw(gateway.url, b"GARBAGE\r\n\r\n")
        long_body = request_line(method, SERIES, extra="Content-Length: 99999999\r\n")
        send_raw(gateway.url, long_body, timeout=3)
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"
    again = httpx.get(gateway.url + SERIES)
    assert (again.headers["x-cache"], again.content) == ("HIT", warm.content)


def test_an_oversized_request_head_gets_a_431_and_the_gateway_carries_on(
    gateway: GatewayServer,
) -> None:
    limit = gateway.settings.max_header_bytes
    huge_header = request_line("GET", SERIES, extra=f"X-Pad: {'a' * (limit + 10)}\r\n")
    status, head, body = send_raw(gateway.url, huge_header)
    assert status == 431 and b"connection: close" in head.lower()
    assert b"request head larger than" in body
    huge_url = request_line("GET", SERIES + "&x=" + "b" * (limit + 10))
    assert send_raw(gateway.url, huge_url)[0] == 431
    assert httpx.get(gateway.url + "/healthz").status_code == 200


def test_a_10000_uid_metadata_form_is_accepted(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """The issue's yardstick for the size limits: about 1 MB of form, forwarded whole."""
    uids = [f"1.3.6.1.4.1.14519.5.2.1.{i}.{i * 7919}.{i * 104729}" for i in range(10_000)]
    form = "&".join(f"list={uid}" for uid in uids).encode()
    assert len(form) > 500_000
    answer = httpx.post(
        gateway.url + f"{S}/v4/getSeriesMetadata",
        content=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert answer.status_code not in (413, 431)
    seen = nbia_upstream.app.requests_to("/v4/getSeriesMetadata")
    assert len(seen) == 1 and seen[0].body == form

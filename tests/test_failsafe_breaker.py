"""Issue 8, items 9, 10 and 18 (upstream side): no client opens the circuit for everyone,
service returns within seconds of the upstream, and upstream errors say what went wrong.

The attacks are sent as raw bytes (an HTTP client would normalise or refuse them); every test
checks that another client is still served and that nothing cached was lost.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from proxy import rawhttp
from proxy.config import Settings
from proxy.endpoints import ENDPOINTS, TokenUse
from proxy.errors import ClientError
from proxy.forwarding import OutgoingRequest, open_shielded
from proxy.gateway import Gateway
from proxy.shield.breaker import Breaker
from proxy.shield.counters import ShieldCounters
from proxy.shield.prober import Prober
from proxy.shield.retry import RetryPolicy
from proxy.upstream import Upstream, UpstreamConfig
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayFactory, GatewayServer, request_line, send_raw

S = "/nbia-api/services"
OTHER = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


def get(server: GatewayServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(server.url + path, timeout=30, **kwargs)


def stats(server: GatewayServer) -> dict[str, Any]:
    return dict(get(server, "/_proxy/cache/stats").json())


def circuit(server: GatewayServer, name: str = "nbia") -> str:
    return str(stats(server)["shield"]["upstreams"][name]["circuit"])


def breaker(server: GatewayServer, name: str = "nbia") -> Breaker:
    gateway: Gateway = server.app
    return next(u.breaker for u in gateway.upstreams if u.name == name)


def error_of(body: bytes) -> dict[str, str]:
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def host_of(server: FakeServer) -> str:
    return f"127.0.0.1:{server.port}"


def small_series(upstream: FakeServer) -> str:
    return next(s.uid for s in upstream.app.dataset.series if not s.big)


# --- item 9: only evidence that the upstream is unwell opens the circuit ----------------------


@pytest.mark.parametrize("value", [b"value ", b"value\t", b"value  \t"])
def test_trailing_whitespace_in_a_header_is_dropped_and_never_opens_the_circuit(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer, value: bytes
) -> None:
    """The issue's attack: five such requests opened the circuit for every user for 30 s,
    because the gateway's own HTTP client refused to send them. Whitespace around a field value
    is not part of it (RFC 9110 §5.5): the gateway drops it, as Tomcat would, and forwards."""
    with make_gateway(circuit_failure_threshold=5) as gw:
        warm = get(gw, OTHER)
        assert warm.status_code == 200
        seen = len(nbia_upstream.app.requests)
        for i in range(5):
            head = request_line("GET", f"{S}/v4/getSeries?Collection=ATTACK{i}")
            attack = head.replace(b"Connection:", b"X-Lab-Tag: " + value + b"\r\nConnection:")
            status, _, _ = send_raw(gw.url, attack)
            assert status == 200
        sent = nbia_upstream.app.requests[seen:]
        assert [call.headers["x-lab-tag"] for call in sent] == ["value"] * 5
        assert circuit(gw) == "closed" and breaker(gw).failures == 0
        again = get(gw, OTHER)
        assert again.status_code == 200 and again.headers["x-cache"] == "HIT"
        assert again.content == warm.content


def test_the_binary_path_forwards_the_same_headers_trimmed(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway() as gw:
        uid = small_series(nbia_upstream)
        head = request_line("GET", f"{S}/v4/getImage?SeriesInstanceUID={uid}")
        status, _, _ = send_raw(gw.url, head.replace(b"Host:", b"X-Lab-Tag: v \r\nHost:"))
        assert status == 200
        [call] = nbia_upstream.app.requests_to("/v4/getImage")
        assert call.headers["x-lab-tag"] == "v"
        assert circuit(gw) == "closed"


def test_headers_the_gateway_drops_anyway_are_not_refused(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """Only what would be forwarded is checked: a client's Cookie never goes upstream."""
    with make_gateway() as gw:
        head = request_line("GET", OTHER)
        status, _, _ = send_raw(gw.url, head.replace(b"Host:", b"Cookie: a=b \r\nHost:"))
        assert status == 200


def _settings(url: str, **extra: Any) -> Settings:
    return Settings(upstream=url, nlst_upstream=url, **extra)


def _upstream(settings: Settings, transport: httpx.AsyncBaseTransport) -> Upstream:
    config = UpstreamConfig("nbia", "", settings.upstream, "nbia_guest", SecretStr(""))
    return Upstream(config, settings, transport=transport)


def _outgoing(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> OutgoingRequest:
    return OutgoingRequest("GET", path.encode(), b"", headers or [], b"")


def test_a_local_protocol_error_is_a_400_and_never_counts() -> None:
    """httpx refusing to send a request is the request's fault, not the upstream's."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError("Illegal header value b'secret '")

    async def scenario() -> None:
        upstream = _upstream(
            _settings("http://upstream.test", circuit_failure_threshold=1),
            httpx.MockTransport(refuse),
        )
        try:
            for _ in range(3):
                with pytest.raises(ClientError) as caught:
                    await open_shielded(
                        upstream,
                        _outgoing(f"{S}/v4/getSeries"),
                        TokenUse.OPTIONAL,
                        False,
                        retry=RetryPolicy(3, 10),
                    )
                assert caught.value.status == 400
                assert "secret" not in caught.value.message
            assert upstream.breaker.state == "closed" and upstream.breaker.failures == 0
        finally:
            await upstream.aclose()

    asyncio.run(scenario())


def test_read_timeouts_of_endpoints_marked_slow_never_open_the_circuit(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """Five getSeriesSize calls past the read time-out: a slow query, not a sick upstream."""
    assert ENDPOINTS["v4/getSeriesSize"].slow
    nbia_upstream.app.slow(seconds_before_headers=3.0, path_contains="getSeriesSize")
    with make_gateway(read_timeout_seconds=0.5, circuit_failure_threshold=5) as gw:
        for i in range(5):
            answer = get(gw, f"{S}/v4/getSeriesSize?SeriesInstanceUID=1.2.{i}")
            assert answer.status_code == 504
            assert answer.json() == {
                "error": f"upstream {host_of(nbia_upstream)} did not answer within 0.5 s",
                "upstream": "nbia",
            }
        assert circuit(gw) == "closed" and breaker(gw).failures == 0
        assert get(gw, OTHER).status_code == 200


def test_read_timeouts_of_ordinary_endpoints_still_count(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    assert not ENDPOINTS["v4/getPatient"].slow
    nbia_upstream.app.slow(seconds_before_headers=3.0, path_contains="getPatient")
    with make_gateway(read_timeout_seconds=0.5, circuit_failure_threshold=2) as gw:
        for i in range(2):
            assert get(gw, f"{S}/v4/getPatient?Collection=C{i}").status_code == 504
        assert circuit(gw) == "open"


def test_one_read_against_a_persistent_503_counts_once_however_often_it_is_retried(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    nbia_upstream.app.fail_next(1000, status=503, retry_after=0, path_contains="getPatient")
    with make_gateway(circuit_failure_threshold=2, retry_max_attempts=4) as gw:
        assert get(gw, f"{S}/v4/getPatient?Collection=X").status_code == 503
        assert len(nbia_upstream.app.requests_to("/v4/getPatient")) == 5  # 1 + 4 retries
        assert breaker(gw).failures == 1 and circuit(gw) == "closed"
        assert get(gw, f"{S}/v4/getPatient?Collection=Y").status_code == 503
        assert circuit(gw) == "open"  # a second client request is evidence: it opens


def test_a_read_that_succeeds_on_retry_counts_no_failure(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    nbia_upstream.app.fail_next(3, status=503, retry_after=0, path_contains="getPatient")
    with make_gateway(circuit_failure_threshold=1) as gw:
        assert get(gw, f"{S}/v4/getPatient?Collection=TCGA-KIRC").status_code == 200
        assert breaker(gw).failures == 0 and circuit(gw) == "closed"


def test_a_refused_service_account_login_does_not_open_the_circuit(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """A wrong password is a configuration error: v4 (no token) must keep working."""
    with make_gateway(
        circuit_failure_threshold=2, username="lab", password=SecretStr("hunter2-secret")
    ) as gw:
        for _ in range(3):
            answer = get(gw, f"{S}/getCollectionValuesAndCounts")
            assert answer.status_code == 502
            message = answer.json()["error"]
            assert message == (
                f"upstream {host_of(nbia_upstream)} refused the service account login (status 401)"
            )
            assert "hunter2" not in answer.text
        assert circuit(gw) == "closed"
        assert get(gw, OTHER).status_code == 200


# --- item 10: active probing, recovery within seconds, /healthz ------------------------------


def test_the_circuit_closes_by_itself_soon_after_the_upstream_returns(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    """No client request is needed: the gateway probes while open (bounds here are generous;
    bench.breaker measures the figure)."""
    with make_gateway(
        circuit_failure_threshold=2, circuit_cooldown_seconds=60, circuit_probe_seconds=0.2
    ) as gw:
        health = get(gw, "/healthz").json()
        assert health["status"] == "ok"
        assert health["upstreams"]["nbia"] == {"mount": "/", "state": "ok", "circuit": "closed"}
        nbia_upstream.stop()
        for i in range(2):
            assert get(gw, f"{S}/v4/getSeries?Collection=DOWN{i}").status_code == 502
        refused = get(gw, f"{S}/v4/getSeries?Collection=DOWN9")
        assert refused.status_code == 503 and "circuit open" in refused.json()["error"]
        while_open = get(gw, "/healthz")
        # Liveness stays 200 "ok": a load balancer must not kill a gateway serving the cache.
        assert while_open.status_code == 200 and while_open.json()["status"] == "ok"
        # Stopped: it refuses connections, so unreachable (a 5xx would be "degraded").
        assert while_open.json()["upstreams"]["nbia"]["state"] == "unreachable"
        assert "refused" in while_open.json()["upstreams"]["nbia"]["last_error"]
        assert while_open.json()["upstreams"]["nbia"]["circuit"] == "open"
        assert while_open.json()["upstreams"]["nlst"]["state"] == "ok"
        time.sleep(1.0)  # a few probes fail against the stopped upstream
        nbia_upstream.app.reset()
        nbia_upstream.start()
        deadline = time.monotonic() + 20
        while get(gw, "/healthz").json()["upstreams"]["nbia"]["state"] != "ok":
            assert time.monotonic() < deadline, "the circuit did not close by itself"
            time.sleep(0.05)
        assert circuit(gw) == "closed"
        answer = get(gw, f"{S}/v4/getSeries?Collection=TCGA-KIRC")
        assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS"
        probes = nbia_upstream.app.requests_to("/v4/getCollectionValues")
        assert probes and all(p.query == "" for p in probes)
        # The probe is neither cached nor counted as client traffic.
        assert "v4/getCollectionValues" not in stats(gw)["endpoints"]
        assert stats(gw)["shield"]["circuit_probes"] >= len(probes)


def test_requests_while_open_get_stale_answers_or_an_immediate_503(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway(
        circuit_failure_threshold=1, circuit_cooldown_seconds=60, circuit_probe_seconds=30
    ) as gw:
        nbia_upstream.stop()
        assert get(gw, f"{S}/v4/getSeries?Collection=DOWN").status_code == 502
        started = time.monotonic()
        refused = get(gw, f"{S}/v4/getSeries?Collection=DOWN2")
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert time.monotonic() - started < 5  # immediate, not after a time-out


def test_probe_intervals_start_short_and_back_off_to_the_cooldown() -> None:
    delays: list[float] = []
    outcomes = iter([False] * 6 + [True])

    async def scenario() -> None:
        counters = ShieldCounters()
        breaker = Breaker("nbia", threshold=1, cooldown=4.0, counters=counters)

        async def probe() -> bool:
            return next(outcomes)

        async def sleep(seconds: float) -> None:
            delays.append(seconds)

        prober = Prober(breaker, probe, first=1.0, sleep=sleep)
        breaker.listener = prober.wake
        breaker.failure()  # opens, and wakes the prober
        assert breaker.state == "open"
        await prober.wait()
        assert breaker.state == "closed"
        assert counters.circuit_probes == 7
        await prober.aclose()

    asyncio.run(scenario())
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]


def test_no_probe_task_outlives_the_gateway(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway(circuit_failure_threshold=1, circuit_probe_seconds=0.1) as gw:
        nbia_upstream.stop()
        get(gw, f"{S}/v4/getSeries?Collection=DOWN")
        upstream = next(u for u in gw.app.upstreams if u.name == "nbia")
        assert upstream.prober.running
    assert not upstream.prober.running


# --- item 18 (upstream side): errors name the host and the cause ------------------------------


def test_a_refused_connection_names_the_host_on_both_paths(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway(circuit_failure_threshold=100) as gw:
        uid = small_series(nbia_upstream)
        nbia_upstream.stop()
        expected = {
            "error": f"upstream {host_of(nbia_upstream)} refused the connection",
            "upstream": "nbia",
        }
        assert get(gw, f"{S}/v4/getSeries?Collection=Q-secret").json() == expected
        assert get(gw, f"{S}/v4/getImage?SeriesInstanceUID={uid}").json() == expected
        token_path = get(gw, f"{S}/getCollectionValuesAndCounts")  # needs a login first
        assert token_path.json() == {
            "error": "service account login: "
            f"upstream {host_of(nbia_upstream)} refused the connection",
            "upstream": "nbia",
        }


def test_an_unresolvable_host_is_named_as_such(make_gateway: GatewayFactory) -> None:
    with make_gateway("http://nbia-upstream.invalid") as gw:
        answer = get(gw, f"{S}/v4/getSeries?Collection=X")
        assert answer.status_code == 502
        assert answer.json()["error"].startswith(
            "upstream nbia-upstream.invalid: could not resolve the host name"
        )
        uid = "1.2.3"
        binary = get(gw, f"{S}/v4/getImage?SeriesInstanceUID={uid}")
        assert binary.json()["error"].startswith(
            "upstream nbia-upstream.invalid: could not resolve the host name"
        )


def test_tls_to_a_plain_http_server_is_a_tls_handshake_failure(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway(f"https://127.0.0.1:{nbia_upstream.port}") as gw:
        answer = get(gw, f"{S}/v4/getSeries?Collection=X")
        assert answer.status_code == 502
        assert answer.json()["error"].startswith(
            f"upstream {host_of(nbia_upstream)}: TLS handshake failed"
        )


@pytest.fixture
def self_signed_server(tmp_path: Path) -> Iterator[int]:
    """A TLS listener with a self-signed certificate (made with the openssl tool)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl tool is needed to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refuses the certificate: that is the point

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(5)
    listener.close()


def test_an_untrusted_certificate_says_certificate_verify_failed(
    make_gateway: GatewayFactory, self_signed_server: int
) -> None:
    with make_gateway(f"https://127.0.0.1:{self_signed_server}") as gw:
        for path in (f"{S}/v4/getSeries?Collection=X", f"{S}/v4/getImage?SeriesInstanceUID=1"):
            message = get(gw, path).json()["error"]
            assert message.startswith(
                f"upstream 127.0.0.1:{self_signed_server}: TLS handshake failed: "
                "certificate verify failed"
            ), message


def test_a_binary_path_time_out_names_the_host_and_the_wait(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    nbia_upstream.app.slow(seconds_before_headers=3.0, path_contains="getImage")
    with make_gateway(read_timeout_seconds=0.5) as gw:
        uid = small_series(nbia_upstream)
        answer = get(gw, f"{S}/v4/getImage?SeriesInstanceUID={uid}")
        assert answer.status_code == 504
        assert answer.json()["error"] == (
            f"upstream {host_of(nbia_upstream)} did not answer within 0.5 s"
        )


# --- the binary path writes headers by hand: it must not be talked into injecting any --------


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"v\r\nx-evil: 1")],
        [(b"x-a", b"v\nx-evil: 1")],
        [(b"x-a", b"v\x00")],
        [(b"x-a\r\nx-evil", b"1")],
        [(b"", b"1")],
        [(b"x-a", b" v")],
    ],
)
def test_rawhttp_refuses_header_bytes_that_would_change_the_request(
    headers: list[tuple[bytes, bytes]],
) -> None:
    received: list[bytes] = []

    async def scenario() -> None:
        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read(65536))
            writer.close()

        server = await asyncio.start_server(record, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(httpx.LocalProtocolError) as caught:
                await rawhttp.send(
                    httpx.URL(f"http://127.0.0.1:{port}/nbia-api/services/v4/getImage"),
                    "GET",
                    headers,
                    b"",
                    connect_timeout=2,
                    read_timeout=2,
                )
            assert b"evil" not in str(caught.value).encode()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
    assert received == []  # refused before anything was written


def test_the_forwarding_layer_refuses_unforwardable_headers_before_any_network() -> None:
    calls: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200)

    async def scenario() -> None:
        upstream = _upstream(_settings("http://upstream.test"), httpx.MockTransport(record))
        try:
            with pytest.raises(ClientError) as caught:
                await open_shielded(
                    upstream,
                    _outgoing(f"{S}/v4/getSeries", [(b"x-lab-tag", b"sec\x7fret")]),
                    TokenUse.OPTIONAL,
                    False,
                )
            assert caught.value.status == 400 and "secret" not in caught.value.message
            assert upstream.breaker.failures == 0
        finally:
            await upstream.aclose()

    asyncio.run(scenario())
    assert calls == []


def test_error_messages_never_carry_the_query_string(
    make_gateway: GatewayFactory, nbia_upstream: FakeServer
) -> None:
    with make_gateway(circuit_failure_threshold=100) as gw:
        nbia_upstream.stop()
        answer = get(gw, f"{S}/v4/getSeries?Collection=do-not-echo-me")
        assert answer.status_code == 502 and "do-not-echo-me" not in answer.text

"""The client's address: forwarding headers are believed from trusted proxies only (issue 8,
item 7).

Every address in 127.0.0.0/8 is loopback on Linux: an attacker's sockets are bound to 127.0.0.2,
another client's to 127.0.0.3, so the per-address cap and "other clients" can be told apart.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Self

import httpx
import psutil
import pytest

from proxy.config import Settings
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

MIB = 1024 * 1024
S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
ATTACKER = "127.0.0.2"
OTHER = "127.0.0.3"
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "nbia-proxy.service"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, source: str, timeout: float = 10.0) -> socket.socket:
    """A raw connection to the gateway from ``source`` (an address in 127.0.0.0/8)."""
    return socket.create_connection(
        ("127.0.0.1", port_of(url)), timeout=timeout, source_address=(source, 0)
    )


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset ends it too)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30)


class Repeating:
    """``step()`` every ``interval`` seconds in a thread, for the length of a ``with`` block."""

    interval = 0.05

    def __init__(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._running = False
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while self._running:
            self.step()
            time.sleep(self.interval)

    def step(self) -> None:
        raise NotImplementedError


class Probe(Repeating):
    """Another client asking ``/healthz`` on fresh connections while an attack runs."""

    def __init__(self, url: str, source: str = OTHER) -> None:
        super().__init__()
        self.url = url
        self.http = client(source)
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def __exit__(self, *exc_info: object) -> None:
        super().__exit__(*exc_info)
        self.http.close()

    def step(self) -> None:
        started = time.monotonic()
        try:
            answer = self.http.get(self.url + "/healthz", headers={"Connection": "close"})
            answer.raise_for_status()
            self.latencies.append(time.monotonic() - started)
        except httpx.HTTPError as exc:
            self.failures.append(repr(exc))


class PeakMemory(Repeating):
    """The highest resident size of a process, sampled every 10 ms."""

    interval = 0.01

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss

    def step(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)


# --- item 7: forwarding headers only from trusted proxies --------------------------------------


def audit_clients(caplog: pytest.LogCaptureFixture, count: int) -> list[tuple[str, str]]:
    """(client, cache) of the audit lines, once ``count`` have been written."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            json.loads(record.getMessage())
            for record in caplog.records
            if record.name == "nbia_proxy.audit"
        ]
        if len(lines) >= count or time.monotonic() > deadline:
            return [(line["client"], line["cache"]) for line in lines]
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("trusted", "audited"),
    [([], "127.0.0.1"), (["127.0.0.2", "10.0.0.0/8"], "127.0.0.1"), (["127.0.0.1"], "203.0.113.9")],
)
def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    caplog: pytest.LogCaptureFixture,
    trusted: list[str],
    audited: str,
) -> None:
    """The audit line names the peer unless the peer is a trusted proxy; on the full path and
    on the protocol's shortcut for hits alike."""
    caplog.set_level(logging.INFO, logger="nbia_proxy.audit")
    settings = make_settings(tmp_path, nbia_upstream.url, trusted_proxies=trusted)
    forged = {"X-Forwarded-For": "203.0.113.9"}
    with GatewayServer(settings) as gateway:
        miss = httpx.get(gateway.url + SERIES, headers=forged)
        hit = httpx.get(gateway.url + SERIES, headers=forged)
        assert gateway.app.shortcut_hits == 1
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert audit_clients(caplog, 2) == [(audited, "MISS"), (audited, "HIT")]


def test_trusted_proxies_come_as_a_list_or_comma_separated_and_are_checked() -> None:
    assert Settings(trusted_proxies="10.0.0.5, 10.1.0.0/16").trusted_proxies == [
        "10.0.0.5",
        "10.1.0.0/16",
    ]
    assert Settings(trusted_proxies=["::1"]).trusted_proxies == ["::1"]
    assert Settings().trusted_proxies == []
    with pytest.raises(ValueError, match="'nginx' is not an IP address or network"):
        Settings(trusted_proxies="nginx")


def wrong_logins(url: str, forwarded_for: list[str]) -> list[int]:
    statuses = []
    for address in forwarded_for:
        answer = httpx.get(
            url + SERIES,
            headers={"Authorization": "Bearer nbk_wrong", "X-Forwarded-For": address},
        )
        statuses.append(answer.status_code)
    return statuses


def test_a_local_caller_cannot_escape_the_lockout_with_x_forwarded_for(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(tmp_path, nbia_upstream.url, access="accounts")
    with GatewayServer(settings) as gateway:
        statuses = wrong_logins(gateway.url, [f"198.51.100.{i}" for i in range(8)])
    assert statuses[:5] == [401] * 5
    assert statuses[6:] == [429, 429]


def test_behind_a_trusted_proxy_the_lockout_is_per_forwarded_client(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(
        tmp_path, nbia_upstream.url, access="accounts", trusted_proxies=["127.0.0.1"]
    )
    with GatewayServer(settings) as gateway:
        statuses = wrong_logins(gateway.url, ["198.51.100.7"] * 8)
        others = wrong_logins(gateway.url, ["198.51.100.8"])
    assert statuses[6:] == [429, 429]
    assert others == [401]  # another client behind the same proxy is not locked out

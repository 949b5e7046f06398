"""/healthz and /readyz of a running gateway, end to end over real sockets.

``/healthz`` is liveness: 200 whatever happens, its body saying per upstream whether it is
``ok``, ``degraded`` (its circuit open after bad answers) or ``unreachable`` (open after failed
connections). ``/readyz`` is readiness: 503 while the database the gateway needs cannot be
reached (PostgreSQL behind a TCP relay the test cuts, then stalls), naming why without the
password, and 200 again once it answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url

from proxy.db import migrate
from tests.databases import database
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings
from tests.test_store_outage import Relay

S = "/nbia-api/services"
PASSWORD = "READY-PW-4471"
#: No upstream listens here: connections to it are refused.
CLOSED = "http://127.0.0.1:9"


def get(gw: GatewayServer, path: str) -> httpx.Response:
    return httpx.get(gw.url + path, timeout=60)


def test_healthz_says_which_upstream_is_ok_degraded_or_unreachable(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    settings = make_settings(
        tmp_path,
        nbia_upstream.url,
        CLOSED,  # the NLST upstream: nothing listens
        circuit_failure_threshold=1,
        retry_max_attempts=0,
        circuit_probe_seconds=0,
        circuit_cooldown_seconds=600,
    )
    with GatewayServer(settings) as gw:
        healthy = get(gw, "/healthz")
        assert healthy.status_code == 200
        states = {name: u["state"] for name, u in healthy.json()["upstreams"].items()}
        assert states == {"nbia": "ok", "nlst": "ok"}

        refused = get(gw, f"/nlst{S}/v4/getCollectionValues")
        assert refused.status_code in (502, 503, 504) and "error" in refused.json()
        nbia_upstream.app.fail_next(1, status=503, path_contains="getSeries")
        assert get(gw, f"{S}/v4/getSeries?Collection=4D-Lung").status_code == 503

        health = get(gw, "/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        upstreams: dict[str, dict[str, Any]] = health.json()["upstreams"]
        assert upstreams["nlst"]["state"] == "unreachable"
        assert upstreams["nbia"]["state"] == "degraded"
        assert upstreams["nbia"]["circuit"] == "open"
        assert "503" in upstreams["nbia"]["last_error"]
        assert upstreams["nbia"]["mount"] == "/" and upstreams["nlst"]["mount"] == "/nlst"
        # Not ready means "send no traffic here": an upstream's outage is not that (the cache
        # still answers), so readiness stays.
        assert get(gw, "/readyz").status_code == 200


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    with database("postgresql", tmp_path) as url:
        migrate(url)
        yield url


@pytest.mark.parametrize("failure", ["cut", "stall"])
def test_readyz_fails_while_postgresql_is_unreachable_and_recovers(
    failure: str, tmp_path: Path, postgres: str, nbia_upstream: FakeServer
) -> None:
    real = make_url(postgres)
    with Relay(real.host or "127.0.0.1", real.port or 5432) as relay:
        # Trust authentication ignores the password: it is there to be looked for.
        url = real.set(host="127.0.0.1", port=relay.port, password=PASSWORD)
        settings = make_settings(
            tmp_path,
            nbia_upstream.url,
            database_url=url.render_as_string(hide_password=False),
            database_timeout_seconds=0.5,
            database_retry_seconds=0.2,
        )
        with GatewayServer(settings) as gw:
            assert get(gw, "/readyz").json() == {"status": "ready"}
            relay.cut() if failure == "cut" else relay.stall()
            down = get(gw, "/readyz")
            assert down.status_code == 503
            body = down.json()
            assert body["status"] == "not ready"
            assert body["reason"].startswith("database unreachable")
            assert PASSWORD not in down.text
            # Still alive, still answering from upstream, and /healthz says so too.
            alive = get(gw, "/healthz")
            assert alive.status_code == 200 and PASSWORD not in alive.text
            assert get(gw, f"{S}/v4/getCollectionValues").status_code == 200
            relay.restore()
            assert get(gw, "/readyz").json() == {"status": "ready"}

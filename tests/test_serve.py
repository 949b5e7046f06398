"""The ``serve`` command as a user runs it: a separate process, one or several workers."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess

SERIES = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_runs_and_caches(tmp_path: Path, nbia_upstream: FakeServer, workers: int) -> None:
    gateway = GatewayProcess(nbia_upstream.url, tmp_path / "data", "--workers", str(workers))
    with gateway:
        assert httpx.get(gateway.url + "/healthz").json()["cache"] is True
        first = httpx.get(gateway.url + SERIES, timeout=10)
        assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
        # With two workers the next request may land on the other one, which sees the entry
        # once the first worker's writer has stored it (a fraction of a second), or misses once.
        results = []
        for _ in range(40):
            results.append(httpx.get(gateway.url + SERIES, timeout=10).headers["x-cache"])
            if results[-1] == "HIT" and len(results) >= 4:
                break
            time.sleep(0.05)
        assert results[-1] == "HIT"
        assert (tmp_path / "data" / "nbia-proxy.sqlite3").exists()
        assert len(nbia_upstream.app.requests_to("/v4/getSeries")) <= workers
    # A clean stop: uvicorn re-raises SIGTERM after its graceful shutdown, or exits 0.
    assert gateway.exit_code in (0, -signal.SIGTERM)

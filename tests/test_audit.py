"""The audit log: one JSON line per request, with who, what, outcome and size; no secrets."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(record.getMessage())
        for record in caplog.records
        if record.name == "nbia_proxy.audit"
    ]


def test_one_line_per_request_with_user_outcome_and_size(
    gateway: GatewayServer, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nbia_proxy.audit")
    login = {"username": "alice", "password": "any", "grant_type": "password"}
    token = httpx.post(gateway.url + "/nbia-api/oauth/token", data=login).json()["access_token"]
    as_alice = {"Authorization": f"Bearer {token}"}
    miss = httpx.get(gateway.url + SERIES, headers=as_alice)
    hit = httpx.get(gateway.url + SERIES, headers=as_alice)  # answered by the protocol shortcut
    uid = nbia_upstream.app.big_series_uid
    zipped = httpx.get(gateway.url + f"{S}/v4/getImage?SeriesInstanceUID={uid}")
    nbia_upstream.stop()
    failed = httpx.get(gateway.url + f"{S}/v4/getSeries?Collection=4D-Lung")
    assert failed.status_code == 502

    # A line is written once its answer has gone out, so the last one may trail the response.
    deadline = time.monotonic() + 5
    while len(audit_lines(caplog)) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    lines = audit_lines(caplog)
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 502]
    token_line, miss_line, hit_line, zip_line, error_line = lines
    assert token_line["path"] == "/nbia-api/oauth/token"
    assert (miss_line["user"], miss_line["cache"], miss_line["bytes"]) == (
        "alice",
        "MISS",
        len(miss.content),
    )
    assert (hit_line["user"], hit_line["cache"], hit_line["bytes"]) == (
        "alice",
        "HIT",
        len(hit.content),
    )
    assert (zip_line["user"], zip_line["cache"], zip_line["bytes"]) == (
        "anonymous",
        "MISS",  # filled into the series cache
        len(zipped.content),
    )
    assert error_line["status"] == 502 and error_line["method"] == "GET"
    for line in lines:
        assert set(line) == {"user", "client", "method", "path", "status", "cache", "bytes", "ms"}
        assert line["client"] == "127.0.0.1" and line["ms"] >= 0
        assert "?" not in line["path"]
    assert token not in caplog.text and "password" not in caplog.text

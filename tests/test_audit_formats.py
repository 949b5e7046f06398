"""``audit_format = "combined"`` end to end: a running gateway writes nginx's combined format
(one line per request, as ``$remote_addr - $remote_user [$time_local] "$request" $status
$body_bytes_sent "$http_referer" "$http_user_agent"``), never JSON, for misses, hits, binary
downloads and errors alike, with secret-looking parameters masked and no header or password in
it; the start-up line names the format."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
COMBINED = re.compile(
    r"(?P<client>\S+) - (?P<user>\S+) \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) "-" "-"'
)


def combined_lines(path: Path, count: int) -> list[re.Match[str]]:
    """The first ``count`` lines of the log, once written (lines go out in batches)."""
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            break
        time.sleep(0.05)
    found = []
    for line in lines:
        match = COMBINED.fullmatch(line)
        assert match is not None, line
        found.append(match)
    return found


def test_a_gateway_set_to_combined_writes_nginx_lines(
    tmp_path: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nbia_proxy.app")
    uid = next(s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung")
    series = f"{S}/v4/getSeries?Collection=4D-Lung"
    image = f"{S}/v4/getImage?SeriesInstanceUID={uid}"
    secret = f"{S}/v4/getSeries?Collection=4D-Lung&password=COMBINED-PW-1&api_key=KEY-2"
    settings = make_settings(
        tmp_path, nbia_upstream.url, audit_format="combined", password="SERVICE-PW-3"
    )
    with GatewayServer(settings) as gw:
        answers = [httpx.get(gw.url + path, timeout=60) for path in (series, series, image, image)]
        missing = httpx.get(gw.url + "/nowhere", timeout=60)
        assert [a.headers.get("x-cache") for a in answers] == ["MISS", "HIT", "MISS", "HIT"]
        httpx.get(gw.url + secret, headers={"Authorization": "Bearer TOKEN-4"}, timeout=60)
        assert gw.app.audit.target is not None
        target = Path(gw.app.audit.target)
        lines = combined_lines(target, 6)
    assert target == tmp_path / "audit.log"
    expected = [
        (f"GET {series} HTTP/1.1", "200", str(len(answers[0].content))),
        (f"GET {series} HTTP/1.1", "200", str(len(answers[1].content))),
        (f"GET {image} HTTP/1.1", "200", str(len(answers[2].content))),
        (f"GET {image} HTTP/1.1", "200", str(len(answers[3].content))),
        ("GET /nowhere HTTP/1.1", "404", str(len(missing.content))),
    ]
    assert [(m["request"], m["status"], m["bytes"]) for m in lines[:5]] == expected
    masked = f"{S}/v4/getSeries?Collection=4D-Lung&password=REDACTED&api_key=REDACTED"
    assert lines[5]["request"] == f"GET {masked} HTTP/1.1"
    text = target.read_text()
    for leaked in ("COMBINED-PW-1", "KEY-2", "SERVICE-PW-3", "TOKEN-4", "Bearer"):
        assert leaked not in text
    assert {(m["client"], m["user"]) for m in lines} == {("127.0.0.1", "-")}
    assert not any(line.startswith("{") for line in target.read_text().splitlines())
    (start,) = [r.getMessage() for r in caplog.records if "starting" in r.getMessage()]
    assert f"audit log {target} (combined)" in start

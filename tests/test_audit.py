"""The audit log: one JSON line per request in a file of its own, with who, what, outcome, size
and true duration; no secrets; nothing lost on a clean stop; reopened on SIGHUP."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from proxy.audit import AuditLog, public_query
from proxy.control import schema_problem, upstream_health
from proxy.db import SCHEMA_HEAD, SQLITE_FILE
from proxy.shield.breaker import Breaker
from proxy.shield.counters import ShieldCounters
from proxy.upstream import Upstream
from tests.downloads import until
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess, GatewayServer, audit_lines, make_settings
from tests.test_failsafe_cli import SERVE, assert_one_line, run_cli

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
MIB = 1024 * 1024
FIELDS = {
    "time",
    "user",
    "client",
    "method",
    "path",
    "query",
    "status",
    "cache",
    "bytes",
    "ms",
    "outcome",
}


def zip_path(uid: str) -> str:
    return f"{S}/v4/getImage?SeriesInstanceUID={uid}"


def slow_request(url: str, target: str, pause: float) -> bytes:
    """A keep-alive GET whose head arrives in two parts ``pause`` apart; the whole answer."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: gateway\r\n".encode())
        time.sleep(pause)
        sock.sendall(b"User-Agent: slow\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head, _, body = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
        while len(body) < length:
            body += sock.recv(65536)
        return head


def test_one_line_per_request_with_user_outcome_and_size(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    login = {"username": "alice", "password": "any", "grant_type": "password"}
    token = httpx.post(gateway.url + "/nbia-api/oauth/token", data=login).json()["access_token"]
    as_alice = {"Authorization": f"Bearer {token}"}
    miss = httpx.get(gateway.url + SERIES, headers=as_alice)
    hit = httpx.get(gateway.url + SERIES, headers=as_alice)  # answered by the protocol shortcut
    assert gateway.app.shortcut_hits == 1
    uid = nbia_upstream.app.big_series_uid
    zipped = httpx.get(gateway.url + zip_path(uid))
    health = httpx.get(gateway.url + "/healthz")
    nbia_upstream.stop()
    failed = httpx.get(gateway.url + f"{S}/v4/getSeries?Collection=4D-Lung")
    assert failed.status_code == 502

    lines = gateway.audit_lines(6)
    assert [line["status"] for line in lines] == [200, 200, 200, 200, 200, 502]
    token_line, miss_line, hit_line, zip_line, health_line, error_line = lines
    assert (token_line["path"], token_line["query"]) == ("/nbia-api/oauth/token", "")
    assert (miss_line["user"], miss_line["cache"], miss_line["bytes"]) == (
        "alice",
        "MISS",
        len(miss.content),
    )
    assert miss_line["query"] == "Collection=TCGA-KIRC&Modality=MR"
    assert (hit_line["user"], hit_line["cache"], hit_line["bytes"]) == (
        "alice",
        "HIT",
        len(hit.content),
    )
    assert hit_line["query"] == miss_line["query"]
    assert (zip_line["user"], zip_line["cache"], zip_line["bytes"]) == (
        "anonymous",
        "MISS",  # filled into the series cache
        len(zipped.content),
    )
    assert (health_line["path"], health_line["bytes"]) == ("/healthz", len(health.content))
    assert error_line["method"] == "GET" and error_line["outcome"] == "ok"
    for line in lines:
        assert set(line) == FIELDS
        assert line["client"] == "127.0.0.1" and line["ms"] >= 0
        assert line["outcome"] == "ok"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    stamp = time.strptime(lines[0]["time"][:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(stamp) - time.mktime(time.gmtime())) < 120  # UTC, not local time


def test_durations_start_at_the_first_byte_of_the_request(gateway: GatewayServer) -> None:
    """On the ASGI path and on the protocol's shortcut for hits alike."""
    assert b" 200 " in slow_request(gateway.url, SERIES, 0.4)  # a miss
    head = slow_request(gateway.url, SERIES, 0.4)  # a shortcut hit
    assert b"x-cache: hit" in head.lower()
    assert gateway.app.shortcut_hits == 1
    miss, hit = gateway.audit_lines(2)
    assert (miss["cache"], hit["cache"]) == ("MISS", "HIT")
    # The head's first part reached the server no sooner than the client sent it (a loaded
    # loop may read it a little late): without the protocol's start time, a few ms at most.
    assert miss["ms"] >= 300 and hit["ms"] >= 300


def test_aborted_and_abandoned_transfers_say_so(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(4 * MIB)
    fake.cut_stream(after_bytes=MIB + 12345, mode="abort", times=1, path_contains="getImage")
    url = gateway.url + zip_path(fake.big_series_uid)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=30)
    # The gateway starts the broken download over in the background (so that a retry is a
    # hit); this is about a download from the upstream, so that one goes first.
    assert gateway.app.series is not None
    fills = gateway.app.series.fills
    until(lambda: fills.in_progress == 0)
    fake.slow(seconds_between_chunks=0.3, path_contains="getImage")
    headers = {"Cache-Control": "no-cache"}  # fetched again, from the slow upstream
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        chunks = response.iter_raw()
        next(chunks)
        time.sleep(0.3)
    aborted, abandoned = gateway.audit_lines(2)
    # A download is a fill of the series cache: MISS, and aborted when the upstream broke off.
    assert (aborted["status"], aborted["cache"], aborted["outcome"]) == (200, "MISS", "aborted")
    assert MIB <= aborted["bytes"] < 4 * MIB
    assert (abandoned["status"], abandoned["cache"]) == (200, "MISS")
    assert abandoned["outcome"] == "abandoned"
    assert 0 < abandoned["bytes"] < 4 * MIB
    assert abandoned["ms"] >= 250  # it lasted until the client went away


def test_an_abandoned_hit_counts_the_bytes_that_went_not_the_file(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    # A kept file goes out by sendfile in one large message; a client that leaves stops it,
    # and its line says what went (at most what the socket buffers took), not the file's size.
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(64 * MIB)
    url = gateway.url + zip_path(fake.big_series_uid)
    size = len(httpx.get(url, timeout=60).content)  # kept
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.headers["x-cache"] == "HIT"
        next(response.iter_raw())
    line = gateway.audit_lines(2)[-1]
    assert (line["status"], line["cache"], line["outcome"]) == (200, "HIT", "abandoned")
    # Sent in 32 MiB messages: what the socket buffers took (a few MB), not a message's count.
    assert 0 < line["bytes"] < 16 * MIB < size


def test_a_transfer_cut_at_shutdown_is_aborted_and_its_line_kept(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    fake = nbia_upstream.app
    fake.set_big_zip_bytes(4 * MIB)
    fake.slow(seconds_between_chunks=0.3, path_contains="getImage")
    settings = make_settings(tmp_path, nbia_upstream.url, shutdown_grace_seconds=0.5)
    gateway = GatewayServer(settings)
    with gateway:
        url = gateway.url + zip_path(fake.big_series_uid)
        with httpx.stream("GET", url, timeout=30) as response:
            chunks = response.iter_raw()
            next(chunks)
            threading.Thread(target=gateway.__exit__, args=(None, None, None)).start()
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:
                    pass
        gateway._thread.join(timeout=10)  # type: ignore[union-attr]
        assert gateway.app.audit.target is not None
        (line,) = audit_lines(gateway.app.audit.target, 1, timeout=0)
    assert (line["status"], line["outcome"]) == (200, "aborted")
    assert 0 < line["bytes"] < 4 * MIB and line["ms"] >= 400


def test_errors_and_refusals_have_their_lines(gateway: GatewayServer) -> None:
    assert httpx.request("PROPFIND", gateway.url + SERIES).status_code == 405
    huge = {"X-Pad": "x" * (gateway.settings.max_header_bytes + 10)}
    assert httpx.get(gateway.url + SERIES, headers=huge).status_code == 431
    assert httpx.get(gateway.url + "/nowhere").status_code == 404
    lines = gateway.audit_lines(3)
    assert [(line["status"], line["method"], line["outcome"]) for line in lines] == [
        (405, "PROPFIND", "ok"),
        (431, "-", "ok"),
        (404, "GET", "ok"),
    ]


def test_a_request_that_joined_another_ones_fetch_says_joined(
    gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    nbia_upstream.app.slow(seconds_before_headers=0.5, path_contains="getSeries")
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: answers.append(httpx.get(gateway.url + SERIES)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "MISS"]
    assert sorted(line["cache"] for line in gateway.audit_lines(2)) == ["JOINED", "MISS"]


def test_nothing_secret_reaches_the_audit_log(
    tmp_path: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {
        "service": "SERVICE-PW-0451",
        "login": "LOGIN-PW-9913",
        "query_login": "QUERY-PW-7781",
        "api_key": "APIKEY-5520",
        "access_token": "ACCESSTOKEN-3317",
        "client_secret": "CLIENTSECRET-8842",
        "password": "PLAIN-PW-6604",
    }
    settings = make_settings(tmp_path, nbia_upstream.url, password=secrets["service"])
    with GatewayServer(settings) as gateway:
        login = {"username": "alice", "password": secrets["login"], "grant_type": "password"}
        token = httpx.post(gateway.url + "/nbia-api/oauth/token", data=login).json()
        token = token["access_token"]
        legacy = f"?username=alice&password={secrets['query_login']}&grant_type=password"
        httpx.post(gateway.url + "/nbia-api/oauth/token" + legacy)
        httpx.get(gateway.url + "/nbia-api/services/oauth/token" + legacy)
        secret_query = (
            f"&api_key={secrets['api_key']}&access_token={secrets['access_token']}"
            f"&client_secret={secrets['client_secret']}&password={secrets['password']}"
        )
        bearer = {"Authorization": f"Bearer {token}"}
        httpx.get(gateway.url + SERIES + secret_query, headers=bearer)
        httpx.get(gateway.url + SERIES + secret_query, headers=bearer)  # a shortcut hit
        lines = gateway.audit_lines(5)
        assert gateway.app.audit.target is not None
        text = Path(gateway.app.audit.target).read_text()
    assert len(lines) == 5 and [line["user"] for line in lines[3:]] == ["alice", "alice"]
    for secret in [*secrets.values(), token]:
        assert secret not in text, secret
    assert lines[3]["query"] == (
        "Collection=TCGA-KIRC&Modality=MR&api_key=REDACTED&access_token=REDACTED"
        "&client_secret=REDACTED&password=REDACTED"
    )
    assert lines[4]["query"] == lines[3]["query"]
    assert all(line["query"] == "" for line in lines[:3])  # the token endpoints: no query
    assert "Bearer" not in text and "Authorization" not in text.lower()


def test_values_that_need_escaping_make_valid_json(tmp_path: Path) -> None:
    path = '/nbia-api/a"b\\c\x01\x1f\x7f\u00e9\u2603\U0001f600'
    query = 'q="x"\\\n\t&n=\u00fc'
    log = AuditLog(tmp_path / "audit.log")
    log.record(
        user='bo"b\\',
        client="::1",
        method="GET",
        path=path,
        query=query,
        status=200,
        cache="HIT",
        size=3,
        started=time.perf_counter(),
    )
    log.close()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    parsed = json.loads(line)
    assert (parsed["path"], parsed["query"], parsed["user"]) == (path, query, 'bo"b\\')
    assert line.isascii()


def test_dash_writes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-")
    log.write('{"a":1}\n')  # no event loop here: written at once
    log.close()
    assert capfd.readouterr().err == '{"a":1}\n'
    assert log.describe() == "stderr (json)" and AuditLog(None).describe() == "off"


def test_the_combined_format_is_nginx_s(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", "combined")
    for user, path in (("alice", "/nbia-api/x"), ("anonymous", '/a "b"\n')):
        log.record(
            user=user,
            client="10.0.0.7",
            method="GET",
            path=path,
            query="Collection=A",
            status=200,
            cache="MISS",
            size=12,
            started=time.perf_counter(),
        )
    log.close()
    first, second = (tmp_path / "audit.log").read_text().splitlines()
    combined = re.compile(
        r'(\S+) - (\S+) \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "([^"]*)" (\d{3}) (\d+) '
        r'"-" "-"'
    )
    match = combined.fullmatch(first)
    assert match is not None
    assert match.group(1, 2, 4, 5, 6) == (
        "10.0.0.7",
        "alice",
        "GET /nbia-api/x?Collection=A HTTP/1.1",
        "200",
        "12",
    )
    match = combined.fullmatch(second)
    assert match is not None and match[2] == "-"
    assert match[4] == "GET /a \\x22b\\x22\\x0A?Collection=A HTTP/1.1"


def test_secret_looking_parameters_are_masked() -> None:
    assert public_query(b"Collection=A&Modality=MR") == "Collection=A&Modality=MR"
    assert public_query(b"") == ""
    assert (
        public_query(b"a=1&Password=x&apiKey=y&token")
        == "a=1&Password=REDACTED&apiKey=REDACTED&REDACTED"
    )


def test_lines_are_batched_until_the_buffer_fills_or_a_second_passes(tmp_path: Path) -> None:
    import asyncio

    target = tmp_path / "audit.log"

    async def main() -> tuple[int, int, int]:
        log = AuditLog(target, buffer_bytes=1000, flush_seconds=0.2)
        log.write("x" * 10 + "\n")
        buffered = target.stat().st_size if target.exists() else 0
        await asyncio.sleep(0.4)
        after_timer = target.stat().st_size
        log.write("y" * 2000 + "\n")  # past the buffer size: written at once
        full = target.stat().st_size
        log.close()
        return buffered, after_timer, full

    assert asyncio.run(main()) == (0, 11, 2012)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_off_when_empty_and_independent_of_the_log_level(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    off = make_settings(tmp_path / "off", nbia_upstream.url, audit_log="")
    with GatewayServer(off) as gateway:
        assert httpx.get(gateway.url + SERIES).status_code == 200
        assert not gateway.app.audit.on
    assert not (tmp_path / "off" / "audit.log").exists()
    quiet = make_settings(tmp_path / "quiet", nbia_upstream.url, log_level="error")
    with GatewayServer(quiet) as gateway:
        assert httpx.get(gateway.url + SERIES).status_code == 200
        assert [line["cache"] for line in gateway.audit_lines(1)] == ["MISS"]
    assert stat.S_IMODE((tmp_path / "quiet" / "audit.log").stat().st_mode) == 0o600


def test_lines_survive_a_clean_stop_and_sighup_reopens_the_file(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    data = tmp_path / "data"
    log_file, rotated = data / "audit.log", data / "audit.log.1"
    with GatewayProcess(nbia_upstream.url, data) as gateway:
        assert httpx.get(gateway.url + SERIES).status_code == 200
        assert any(line["path"].endswith("getSeries") for line in audit_lines(log_file, 2))
        log_file.rename(rotated)  # what logrotate does, then it signals
        os.kill(gateway.pid, signal.SIGHUP)
        time.sleep(0.3)
        assert httpx.get(gateway.url + SERIES).status_code == 200
        other = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=CT"
        assert httpx.get(gateway.url + other).status_code == 200
    assert gateway.exit_code == 0
    # Read right after the stop: the lines of the last second were flushed on the way out.
    before = [line for line in audit_lines(rotated, timeout=0) if line["path"].endswith("s")]
    after = audit_lines(log_file, timeout=0)
    assert [line["cache"] for line in before] == ["MISS"]
    assert [(line["cache"], line["query"][-7:]) for line in after] == [
        ("HIT", "lity=MR"),
        ("MISS", "lity=CT"),
    ]
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_an_audit_log_that_cannot_be_opened_stops_the_start_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "audit.log"
    data = ("--data-dir", str(tmp_path / "data"))
    run = run_cli(*SERVE, *data, "--audit-log", str(missing), cwd=tmp_path)
    assert_one_line(run, 2, f"audit_log {missing} cannot be created", "does not exist")
    assert not missing.parent.exists()


# --- start-up and health ---------------------------------------------------------------------


def test_one_start_up_line_says_what_is_in_effect(
    tmp_path: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nbia_proxy.app")
    settings = make_settings(
        tmp_path, nbia_upstream.url, "http://127.0.0.1:9/nlst", password="SERVICE-PW-1"
    )
    with GatewayServer(settings):
        pass
    (line,) = [r.getMessage() for r in caplog.records if "starting" in r.getMessage()]
    for expected in (
        f"nbia {nbia_upstream.url} at /",
        "nlst http://127.0.0.1:9/nlst at /nlst",
        f"data dir {tmp_path.resolve()}",
        f"database sqlite:///{tmp_path.resolve() / SQLITE_FILE}",
        "access open",
        "offline off",
        "workers 1",
        f"audit log {tmp_path / 'audit.log'} (json)",
    ):
        assert expected in line, (expected, line)
    assert "SERVICE-PW-1" not in caplog.text


def test_readyz_fails_while_migrations_are_pending(gateway: GatewayServer) -> None:
    assert httpx.get(gateway.url + "/readyz").json() == {"status": "ready"}
    database = gateway.settings.data_dir / SQLITE_FILE
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0001'")
    pending = httpx.get(gateway.url + "/readyz")
    assert pending.status_code == 503 and "migrations pending" in pending.json()["reason"]
    assert httpx.get(gateway.url + "/healthz").status_code == 200  # still alive
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = ?", (SCHEMA_HEAD,))
    assert httpx.get(gateway.url + "/readyz").status_code == 200


def test_readyz_names_an_unreachable_database_without_its_password(tmp_path: Path) -> None:
    problem = schema_problem("postgresql+psycopg://user:DB-PW-77@127.0.0.1:1/nbia")
    assert problem is not None and problem.startswith("database unreachable")
    assert "DB-PW-77" not in problem
    empty = tmp_path / "empty.sqlite3"
    assert schema_problem(f"sqlite:///{empty}") == "migrations pending (no schema yet)"


def test_readyz_without_a_database_is_ready(tmp_path: Path, nbia_upstream: FakeServer) -> None:
    settings = make_settings(tmp_path, nbia_upstream.url, cache_enabled=False)
    with GatewayServer(settings) as gateway:
        assert httpx.get(gateway.url + "/readyz").status_code == 200


def fake_upstream(breaker: Breaker) -> Upstream:
    return cast(Upstream, SimpleNamespace(breaker=breaker, config=SimpleNamespace(mount="")))


def test_healthz_tells_unreachable_from_degraded() -> None:
    breaker = Breaker("nbia", threshold=2, cooldown=60, counters=ShieldCounters())
    assert upstream_health(fake_upstream(breaker)) == {
        "mount": "/",
        "state": "ok",
        "circuit": "closed",
    }
    for _ in range(2):
        breaker.failure("upstream nbia answered 503")
    health: dict[str, Any] = upstream_health(fake_upstream(breaker))
    assert (health["state"], health["last_error"]) == ("degraded", "upstream nbia answered 503")
    breaker.failure("upstream nbia refused the connection", unreachable=True)
    assert upstream_health(fake_upstream(breaker))["state"] == "unreachable"
    breaker.success()
    assert upstream_health(fake_upstream(breaker))["state"] == "ok"

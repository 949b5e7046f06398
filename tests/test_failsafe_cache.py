"""No client can poison the cache: a key describes exactly what the upstream reads (issue 8).

Items 1, 2, 13 and the key half of 15: a GET body, client-caused errors, a POST's fields in the
query, a Content-Type that only starts like a form, a head over Tomcat's 8 KB, a mistaken
upstream URL, and answers too large to hold. The attacks are the exact request shapes, written
over raw sockets; each test checks that the next clean client gets what the upstream would
give it and that the cache holds nothing the attack caused.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import select

from proxy.cache.policy import make_key
from proxy.cache.shape import Fit, classify, head_size, is_form, storable
from proxy.cache.tables import CacheEntry
from proxy.endpoints import ENDPOINTS, Endpoint
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.fake_nbia.responses import HugeJson
from tests.gateway_server import GatewayProcess, GatewayServer, make_settings, send_raw

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries"
METADATA = f"{S}/v4/getSeriesMetadata"
FORM = "application/x-www-form-urlencoded"
MiB = 1024 * 1024


# --- helpers -------------------------------------------------------------------------------


def raw(
    server: GatewayServer,
    method: str,
    target: str,
    body: bytes = b"",
    headers: str = "",
    chunked: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One request written by hand; (status, lower-case headers, body)."""
    head = f"{method} {target} HTTP/1.1\r\nHost: gateway\r\n{headers}"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n"
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        payload = body
    status, raw_head, raw_body = send_raw(
        server.url, (head + "Connection: close\r\n\r\n").encode() + payload
    )
    fields = {}
    for line in raw_head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    if fields.get("transfer-encoding") == "chunked":
        raw_body = _unchunk(raw_body)
    return status, fields, raw_body


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request and its answer on a kept-alive connection (Content-Length answers only)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    while len(body) < int(fields["content-length"]):
        body += sock.recv(65536)
    return int(head.split()[1]), fields, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def direct(fake: FakeServer, method: str, target: str, body: bytes = b"") -> httpx.Response:
    """What the upstream itself answers to the clean request."""
    headers = {"content-type": FORM} if method == "POST" else {}
    return httpx.request(method, fake.url + target, content=body, headers=headers, timeout=30)


def entries(server: GatewayServer) -> list[CacheEntry]:
    """Every stored entry (after the writer caught up)."""
    cache = server.app.cache
    assert cache is not None
    cache.writer.flush()
    with cache.store.engine.connect() as connection:
        return list(connection.execute(select(CacheEntry)).all())  # type: ignore[arg-type]


def sent_to(fake: FakeServer, suffix: str) -> int:
    return len(fake.app.requests_to(suffix))


@pytest.fixture
def gw(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url)) as server:
        yield server


def uids(fake: FakeServer, collection: str = "4D-Lung") -> list[str]:
    return [s.uid for s in fake.app.dataset.series if s.collection == collection]


# --- the rules, as pure functions -------------------------------------------------------------

GET_SERIES = ENDPOINTS["v4/getSeries"]
POST_METADATA = ENDPOINTS["v4/getSeriesMetadata"]
GET_IMAGE = ENDPOINTS["v4/getImage"]
FORM_CT = [(b"content-type", FORM.encode())]


@pytest.mark.parametrize(
    ("endpoint", "method", "query", "body", "headers", "head", "expected"),
    [
        (GET_SERIES, "GET", b"Collection=X", b"", [], 300, Fit.EXACT),
        (GET_SERIES, "GET", b"", b"Collection=X", FORM_CT, 300, Fit.REFUSED),
        (GET_SERIES, "HEAD", b"", b"Collection=X", [], 300, Fit.REFUSED),
        (GET_IMAGE, "GET", b"", b"x", [], 300, Fit.REFUSED),  # any catalogued endpoint
        (GET_SERIES, "GET", b"Collection=X", b"", [], 7200, Fit.CACHED),  # near 8 KB
        (GET_SERIES, "HEAD", b"Collection=X", b"", [], 300, Fit.UNCACHED),
        (GET_SERIES, "POST", b"", b"Collection=X", FORM_CT, 300, Fit.UNCACHED),  # 405 upstream
        (GET_IMAGE, "GET", b"SeriesInstanceUID=1", b"", [], 300, Fit.UNCACHED),
        (POST_METADATA, "POST", b"", b"list=1", FORM_CT, 300, Fit.EXACT),
        (POST_METADATA, "POST", b"list=1", b"", FORM_CT, 300, Fit.CACHED),  # fields in query
        (POST_METADATA, "POST", b"list=1", b"list=2", FORM_CT, 300, Fit.CACHED),
        (POST_METADATA, "POST", b"", b"list=1", FORM_CT, 8000, Fit.CACHED),
        (POST_METADATA, "POST", b"", b"", [], 300, Fit.CACHED),  # empty, no form type
        (POST_METADATA, "POST", b"", b"list=1", [], 300, Fit.UNCACHED),  # body, no type
        (
            POST_METADATA,
            "POST",
            b"",
            b"list=1",
            [(b"content-type", FORM.encode() + b"foo")],
            300,
            Fit.UNCACHED,
        ),
        (
            POST_METADATA,
            "POST",
            b"",
            b'{"list": 1}',
            [(b"content-type", b"application/json")],
            300,
            Fit.UNCACHED,
        ),
        (POST_METADATA, "POST", b"", b"list=1", [*FORM_CT, *FORM_CT], 300, Fit.UNCACHED),
        (
            POST_METADATA,
            "POST",
            b"",
            b"list=1",
            [*FORM_CT, (b"content-encoding", b"gzip")],
            300,
            Fit.UNCACHED,
        ),
        (POST_METADATA, "GET", b"list=1", b"", [], 300, Fit.UNCACHED),  # 405 upstream
        (ENDPOINTS["createSharedList"], "POST", b"", b"name=x", FORM_CT, 300, Fit.UNCACHED),
    ],
)
def test_classify_says_how_far_a_key_describes_the_request(
    endpoint: Endpoint,
    method: str,
    query: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    head: int,
    expected: Fit,
) -> None:
    verdict = classify(endpoint, method, query, body, headers, head)
    assert verdict.fit is expected
    assert bool(verdict.reason) is (expected is not Fit.EXACT)


@pytest.mark.parametrize(
    ("content_type", "form"),
    [
        (b"application/x-www-form-urlencoded", True),
        (b"Application/X-WWW-Form-URLEncoded", True),
        (b"application/x-www-form-urlencoded; charset=UTF-8", True),
        (b'application/x-www-form-urlencoded;charset="utf-8"', True),
        (b"application/x-www-form-urlencoded;", True),
        (b"application/x-www-form-urlencodedfoo", False),
        (b"application/x-www-form-urlencoded foo", False),
        (b"application/x-www-form-urlencoded; charset=ISO-8859-1", False),  # other parameters
        (b"application/x-www-form-urlencoded; boundary=x", False),
        (b"application/x-www-form-urlencoded, text/plain", False),
        (b"multipart/form-data; boundary=x", False),
        (b"", False),
    ],
)
def test_form_media_type_is_parsed_exactly(content_type: bytes, form: bool) -> None:
    assert is_form(content_type) is form


def test_errors_are_storable_only_for_exact_requests_clear_of_the_head_limit() -> None:
    assert storable(200, Fit.EXACT, 500) and storable(200, Fit.CACHED, None)
    assert storable(400, Fit.EXACT, 500) and storable(404, Fit.EXACT, 7168)
    assert not storable(400, Fit.EXACT, 7169)  # the service token pushed it near the limit
    assert not storable(400, Fit.EXACT, None)  # unknown
    assert not storable(400, Fit.CACHED, 500)
    assert not storable(200, Fit.UNCACHED, 500) and not storable(200, Fit.REFUSED, 500)


def test_head_size_counts_what_goes_on_the_wire() -> None:
    wire = b"GET /a?b=1 HTTP/1.1\r\nhost: x\r\nx-a: 12\r\n\r\n"
    assert head_size("GET", b"/a?b=1", [(b"host", b"x"), (b"x-a", b"12")]) == len(wire)


def test_keys_hold_query_and_form_apart_and_name_the_upstream_url() -> None:
    origin = "https://services.cancerimagingarchive.net"
    in_query = make_key(origin, "nbia", "anonymous", "POST", POST_METADATA, [("list", "1")], [])
    in_form = make_key(origin, "nbia", "anonymous", "POST", POST_METADATA, [], [("list", "1")])
    both = make_key(origin, "nbia", "anonymous", "POST", POST_METADATA, [("a", "1")], [("b", "2")])
    merged = make_key(
        origin, "nbia", "anonymous", "POST", POST_METADATA, [], [("a", "1"), ("b", "2")]
    )
    elsewhere = make_key(
        "http://host/nbia-api", "nbia", "anonymous", "POST", POST_METADATA, [], [("list", "1")]
    )
    digests = {k.digest for k in (in_query, in_form, both, merged, elsewhere)}
    assert len(digests) == 5
    assert (in_query.params, in_form.params, both.params) == ("?list=1", "list=1", "?a=1 b=2")
    assert elsewhere.upstream == "nbia"  # the column keeps the short name (String(32))
    assert in_query.tags == in_form.tags == frozenset({("series", "1")})


# --- item 1: a GET body ----------------------------------------------------------------------


def test_a_get_body_is_refused_and_never_keyed(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """GET getSeries with the body Collection=X used to store the unfiltered list under the
    key of getSeries?Collection=X, for every user."""
    attack = b"Collection=4D-Lung"
    for method in ("GET", "HEAD"):
        status, headers, body = raw(gw, method, SERIES, attack, f"Content-Type: {FORM}\r\n")
        assert status == 400
        if method == "GET":
            assert "body" in json.loads(body)["error"]
    assert sent_to(nbia_upstream, "/v4/getSeries") == 0  # nothing was forwarded
    assert entries(gw) == []
    clean = f"{SERIES}?Collection=4D-Lung"
    status, headers, body = raw(gw, "GET", clean)
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert body == direct(nbia_upstream, "GET", clean).content  # the filtered list
    assert {r.body for r in nbia_upstream.app.requests_to("/v4/getSeries")} == {b""}


def test_the_hit_shortcut_never_answers_a_get_with_a_body(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """The memo of known request lines answers kept-alive GETs from memory: a GET with a body
    on the same line must still reach the full path and its refusal."""
    clean = f"{SERIES}?Collection=4D-Lung"
    line = f"GET {clean} HTTP/1.1\r\nHost: gateway\r\n"
    url = httpx.URL(gw.url)
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        assert exchange(sock, (line + "\r\n").encode())[1]["x-cache"] == "MISS"
        assert exchange(sock, (line + "\r\n").encode())[1]["x-cache"] == "HIT"
        assert gw.app.shortcut_hits == 1  # the memo knows this request line
        attack = b"Collection=TCGA-KIRC"
        sized = f"{line}Content-Length: {len(attack)}\r\n\r\n".encode() + attack
        chunked = f"{line}Transfer-Encoding: chunked\r\n\r\n".encode()
        chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(attack), attack)
        for request in (sized, chunked):
            status, _, body = exchange(sock, request)
            assert status == 400 and b"body" in body
        assert gw.app.shortcut_hits == 1
        # An empty body (Content-Length: 0, a bare last chunk) is no body: a hit, the long way.
        for empty in (
            f"{line}Content-Length: 0\r\n\r\n",
            f"{line}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ):
            status, fields, _ = exchange(sock, empty.encode())
            assert (status, fields["x-cache"]) == (200, "HIT")
        assert exchange(sock, (line + "\r\n").encode())[1]["x-cache"] == "HIT"
        assert gw.app.shortcut_hits == 2
    assert sent_to(nbia_upstream, "/v4/getSeries") == 1


# --- item 2: errors the client caused are relayed, not stored --------------------------------


def test_a_head_over_nbia_limit_gets_its_400_uncached(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    clean = f"{SERIES}?Collection=4D-Lung"
    status, headers, body = raw(gw, "GET", clean, headers="X-Pad: " + "a" * 9000 + "\r\n")
    assert status == 400 and b"HTTP Status 400" in body  # Tomcat's page, relayed
    assert entries(gw) == []
    status, headers, body = raw(gw, "GET", clean)
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert body == direct(nbia_upstream, "GET", clean).content


def test_a_post_resource_reads_its_form_not_the_query(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """Fields in the query reach NBIA as an empty form: its 400 (and its 200 for a form that
    says less than query and body together) must not answer the clean form POST."""
    a, b = uids(nbia_upstream)[:2]
    form = f"Content-Type: {FORM}\r\n"
    status, headers, _ = raw(gw, "POST", f"{METADATA}?list={a}", b"", form)
    assert (status, headers["x-cache"]) == (400, "MISS")
    status, headers, body = raw(gw, "POST", METADATA, f"list={a}".encode(), form)
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert body == direct(nbia_upstream, "POST", METADATA, f"list={a}".encode()).content

    status, _, only_b = raw(gw, "POST", f"{METADATA}?list={a}", f"list={b}".encode(), form)
    assert status == 200 and a not in only_b.decode() and b in only_b.decode()
    status, headers, both = raw(gw, "POST", METADATA, f"list={a}&list={b}".encode(), form)
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert a in both.decode() and b in both.decode()
    # The query-shaped 200 is cached under its own key; the 400 was never stored.
    assert raw(gw, "POST", f"{METADATA}?list={a}", f"list={b}".encode(), form)[1]["x-cache"] == (
        "HIT"
    )
    assert raw(gw, "POST", f"{METADATA}?list={a}", b"", form)[1]["x-cache"] == "MISS"
    assert sorted(e.status for e in entries(gw)) == [200, 200, 200]


@pytest.mark.parametrize(
    "content_type", [f"{FORM}foo", f"{FORM}; charset=ISO-8859-1", "text/plain"]
)
def test_a_content_type_that_only_looks_like_a_form_is_relayed_uncached(
    gw: GatewayServer, nbia_upstream: FakeServer, content_type: str
) -> None:
    a = uids(nbia_upstream)[0]
    body = f"list={a}".encode()
    status, headers, _ = raw(gw, "POST", METADATA, body, f"Content-Type: {content_type}\r\n")
    assert headers["x-cache"] == "BYPASS"
    assert entries(gw) == []
    status, headers, answer = raw(gw, "POST", METADATA, body, f"Content-Type: {FORM}\r\n")
    assert (status, headers["x-cache"]) == (200, "MISS") and a in answer.decode()


def test_form_content_type_spellings_share_one_key(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    body = f"list={uids(nbia_upstream)[0]}".encode()
    assert raw(gw, "POST", METADATA, body, f"Content-Type: {FORM}\r\n")[1]["x-cache"] == "MISS"
    for spelling in (f"{FORM}; charset=UTF-8", FORM.upper()):
        fields = raw(gw, "POST", METADATA, body, f"Content-Type: {spelling}\r\n")[1]
        assert fields["x-cache"] == "HIT"


def test_exact_400_is_still_remembered(gw: GatewayServer, nbia_upstream: FakeServer) -> None:
    """The clean shape of a deterministic error keeps its negative caching."""
    form = f"Content-Type: {FORM}\r\n"
    assert raw(gw, "POST", METADATA, b"format=csv", form)[:2][0] == 400
    status, headers, _ = raw(gw, "POST", METADATA, b"format=csv", form)
    assert (status, headers["x-cache"]) == (400, "HIT")


def test_a_request_the_key_does_not_describe_never_answers_concurrent_clients(
    gw: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """A 9 KB head arriving first must not lead the flight a clean client joins."""
    nbia_upstream.app.slow(seconds_before_headers=1.5, path_contains="getSeries")
    clean = f"{SERIES}?Collection=4D-Lung"
    pad = "X-Pad: " + "a" * 9000 + "\r\n"
    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(raw, gw, "GET", clean, b"", pad)
        time.sleep(0.3)
        innocent = pool.submit(raw, gw, "GET", clean)
        assert hostile.result()[0] == 400
        status, headers, body = innocent.result()
    nbia_upstream.app.slow()
    assert (status, headers["x-cache"]) == (200, "MISS")
    assert body == direct(nbia_upstream, "GET", clean).content


# --- item 15 (keys): the cache follows the upstream URL --------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_from_another_upstream_url_are_never_served(
    tmp_path: Path, nbia_upstream: FakeServer, backend: str
) -> None:
    values = f"{S}/v4/getCollectionValues"
    with database(backend, tmp_path) as url:
        # A path NBIA does not have (the gateway refuses one ending in /nbia-api outright).
        wrong = make_settings(tmp_path, nbia_upstream.url + "/tcia", database_url=url)
        with GatewayServer(wrong) as server:
            first = httpx.get(server.url + values, timeout=30)
            assert (first.status_code, first.headers["x-cache"]) == (404, "MISS")
            assert [e.upstream for e in entries(server)] == ["nbia"]
        right = make_settings(tmp_path, nbia_upstream.url, database_url=url)
        with GatewayServer(right) as server:
            again = httpx.get(server.url + values, timeout=30)
            assert (again.status_code, again.headers["x-cache"]) == (200, "MISS")
            assert again.content == direct(nbia_upstream, "GET", values).content


# --- item 13: answers too large to hold ------------------------------------------------------


def huge_digest(size: int) -> str:
    """The SHA-256 of the fake's huge JSON of ``size`` bytes, made the way the fake makes it."""
    digest = hashlib.sha256()
    for piece in HugeJson(size, "", False).pieces(1024 * 1024):
        digest.update(piece)
    return digest.hexdigest()


def fetch_all(url: str) -> tuple[int, str, int, str]:
    """(status, X-Cache, bytes, SHA-256) of a streamed GET."""
    digest = hashlib.sha256()
    size = 0
    with httpx.stream("GET", url, timeout=120) as response:
        for chunk in response.iter_raw():
            digest.update(chunk)
            size += len(chunk)
        return response.status_code, response.headers["x-cache"], size, digest.hexdigest()


@pytest.mark.parametrize("declare_length", [False, True])
def test_an_answer_over_the_bound_is_relayed_whole_and_not_stored(
    tmp_path: Path, nbia_upstream: FakeServer, declare_length: bool
) -> None:
    size = 3 * MiB
    nbia_upstream.app.serve_huge_json(size, "getSeries", declare_length=declare_length)
    settings = make_settings(tmp_path, nbia_upstream.url, max_cached_body_bytes=MiB)
    with GatewayServer(settings) as server:
        url = f"{server.url}{SERIES}?Collection=Huge"
        expected = (200, "BYPASS", size, huge_digest(size))
        assert fetch_all(url) == expected
        assert fetch_all(url) == expected  # not a hit: never stored
        assert sent_to(nbia_upstream, "/v4/getSeries") == 2
        small = httpx.get(f"{server.url}{S}/v4/getCollectionValues", timeout=30)
        assert small.headers["x-cache"] == "MISS"
        assert [e.endpoint for e in entries(server)] == ["v4/getCollectionValues"]


def test_waiters_of_a_flight_too_large_to_share_each_get_the_whole_answer(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    """The request whose fetch it was relays the flight's answer; each waiter asks again,
    streamed, on its own: one upstream request per client, every byte to every client."""
    size = 2 * MiB
    nbia_upstream.app.serve_huge_json(size, "getSeries")
    nbia_upstream.app.slow(seconds_before_headers=2.0, path_contains="getSeries")
    settings = make_settings(tmp_path, nbia_upstream.url, max_cached_body_bytes=256 * 1024)
    with GatewayServer(settings) as server:
        url = f"{server.url}{SERIES}?Collection=Huge"
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(lambda _: fetch_all(url), range(5)))
        nbia_upstream.app.slow()
        assert results == [(200, "BYPASS", size, huge_digest(size))] * 5
        assert sent_to(nbia_upstream, "/v4/getSeries") == 5  # the first one's was relayed
        assert server.app.counters.coalesced >= 1  # some did wait for that flight
        assert entries(server) == []


class PeakRss:
    """Samples a process's resident memory every 10 ms until stopped."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize(
    ("declare_length", "extra"),
    [(False, ()), (True, ()), (False, ("--no-cache-enabled",))],
    ids=["chunked", "declared", "cache-off"],
)
def test_memory_stays_flat_for_a_200_mb_json_answer(
    tmp_path: Path, nbia_upstream: FakeServer, declare_length: bool, extra: tuple[str, ...]
) -> None:
    """A gateway process relays 200 MB of JSON with its memory bounded by the 8 MiB limit
    (plus a generous margin), and the client gets every byte. Before: the body was held whole
    (and stored), 300 MB took the process from 89 to about 1,450 MB."""
    size, limit = 200 * MiB, 8 * MiB
    nbia_upstream.app.serve_huge_json(size, "getSeries", declare_length=declare_length)
    args = ("--max-cached-body-bytes", str(limit), *extra)
    with GatewayProcess(nbia_upstream.url, tmp_path, *args) as gateway:
        url = f"{gateway.url}{SERIES}?Collection=Huge"
        with PeakRss(gateway.pid) as rss:
            status, cache, received, digest = fetch_all(url)
            time.sleep(0.5)  # a late copy into the store would show here
    assert (status, cache, received) == (200, "BYPASS", size)
    assert digest == huge_digest(size)
    grown = rss.peak - rss.base
    assert grown < limit + 100 * MiB, f"RSS grew by {grown // MiB} MiB"

"""Known heads: a repeated request head answered from what httptools parsed of it before.

The shortcut skips the parser only for the exact bytes of a head it answered, arriving whole in
one read while the connection is idle. These tests drive the gateway's protocol directly (a
recording transport, the app started in a loop thread) so that every byte boundary is chosen
by the test; the fuzz checks that whenever the parser is skipped, a fresh httptools parse of
those bytes gives the request the known head says, and that a connection answers the same
whether the parser was skipped or not.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httptools
import pytest
import uvicorn
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from proxy.app import create_app
from proxy.gateway import Gateway
from proxy.hit_memo import KnownHead
from proxy.hit_protocol import HitProtocol
from proxy.server import uvicorn_options
from tests.fake_nbia import FakeServer
from tests.gateway_server import make_settings
from tests.transport import RecordingTransport

PATH = "/nbia-api/services/v4/getSeries"
QUERY = "Collection=TCGA-KIRC&Modality=MR"
HEAD = f"GET {PATH}?{QUERY} HTTP/1.1\r\nHost: gateway\r\nAccept: */*\r\n\r\n".encode()
T = TypeVar("T")


class Recording(dict[bytes, KnownHead]):
    """The known heads, noting every read answered from one."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[bytes] = []

    def get(self, key: bytes, default: Any = None) -> Any:
        known = super().get(key, default)
        if known is not None:
            self.used.append(key)
        return known


class Harness:
    """The gateway app started in a loop of its own thread, and connections to its protocol."""

    def __init__(self, tmp: Path, upstream: str, **extra: Any) -> None:
        self.settings = make_settings(tmp, upstream, **({"audit_log": ""} | extra))
        self.app: Gateway = create_app(self.settings)
        options = uvicorn_options(self.settings) | {"lifespan": "on", "log_level": "error"}
        self.config = uvicorn.Config(self.app, **options)
        self.config.load()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._lifespan = LifespanOn(self.config)
        self.run(self._lifespan.startup())
        assert self.app.cached is not None
        self.heads = Recording()
        self.app.cached.memo.heads = self.heads

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def close(self) -> None:
        self.run(self._lifespan.shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def exchange(self, reads: list[bytes], *, peer: str = "127.0.0.1") -> bytes:
        """Feed ``reads`` to a new connection one at a time, each once the answers to the
        previous ones are written; everything the connection wrote."""

        async def go() -> bytes:
            protocol = HitProtocol(config=self.config, server_state=ServerState(), app_state={})
            wire = RecordingTransport(peer)
            protocol.connection_made(wire)  # type: ignore[arg-type]
            for data in reads:
                if wire.closed:
                    break
                protocol.data_received(data)
                await settled(protocol)
            protocol.connection_lost(None)
            return bytes(wire.out)

        return self.run(go())


async def settled(protocol: HitProtocol) -> None:
    """Until the connection has answered what it can (pytest-timeout bounds a hang)."""
    for _ in range(3):
        await asyncio.sleep(0)
    while not protocol.transport.is_closing() and (
        protocol.pipeline or (protocol.cycle is not None and not protocol.cycle.response_complete)
    ):
        await asyncio.sleep(0.001)
    await asyncio.sleep(0)


@pytest.fixture
def harness(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[Harness]:
    harness = Harness(tmp_path, nbia_upstream.url)
    try:
        assert b"x-cache: MISS" in harness.exchange([HEAD])  # through the ASGI path: stored
        yield harness
    finally:
        harness.close()


def answers(output: bytes) -> list[tuple[str, str]]:
    """(status line, X-Cache) of each response in ``output``, Age and Date aside."""
    found = []
    for match in re.finditer(rb"(HTTP/1\.1 [^\r]*)\r\n((?:[^\r]+\r\n)*)\r\n", output):
        cache = re.search(rb"(?im)^x-cache: *(\S+)", match[2])
        found.append((match[1].decode(), cache[1].decode() if cache else "-"))
    return found


def without_age(output: bytes) -> bytes:
    return re.sub(rb"(?im)^(age|date): [^\r]*\r\n", b"", output)


def test_a_repeated_head_is_answered_without_the_parser(harness: Harness) -> None:
    first = harness.exchange([HEAD])  # the shortcut, through the parser: the head is learnt
    assert HEAD in harness.heads and not harness.heads.used
    known = harness.heads[HEAD]
    assert (known.path, known.query) == (PATH, QUERY.encode())
    second = harness.exchange([HEAD, HEAD])
    assert harness.heads.used == [HEAD, HEAD]
    assert answers(second) == [("HTTP/1.1 200 OK", "HIT")] * 2
    assert without_age(second) == without_age(first) * 2
    assert harness.app.shortcut_hits == 3


@pytest.mark.parametrize(
    "reads",
    [
        pytest.param([HEAD + HEAD] * 2, id="two pipelined in one read"),
        pytest.param([HEAD[:20], HEAD[20:]] * 2, id="split in two reads"),
        pytest.param([HEAD[:-2], HEAD[-2:] + HEAD] * 2, id="a split head, then the head whole"),
        pytest.param([HEAD + b"\r\n"] * 2, id="a blank line after it"),
        pytest.param([HEAD + b"GET", b" / HTTP/1.1\r\n\r\n"] * 2, id="another request begun"),
    ],
)
def test_reads_that_are_not_one_whole_head_go_through_the_parser(
    harness: Harness, reads: list[bytes]
) -> None:
    """Sent twice, so that what the first time could wrongly teach shows the second time."""
    harness.exchange([HEAD])  # learnt
    output = harness.exchange(reads)
    assert harness.heads.used == []
    assert set(harness.heads) == {HEAD}
    statuses = [status for status, _ in answers(output)]
    assert len(statuses) == b"".join(reads).count(b"GET ")
    assert statuses.count("HTTP/1.1 200 OK") == b"".join(reads).count(HEAD)


def test_a_known_head_after_part_of_another_is_parsed_with_it(harness: Harness) -> None:
    """Bytes that equal a known head but arrive while the parser holds the start of another
    request belong to that request: the parser sees them (here: an invalid head, 400)."""
    harness.exchange([HEAD])
    for start in (HEAD[:-2], b"GET", b"GET /x HTTP/1.1\r\nX-Long: "):
        output = harness.exchange([start, HEAD])
        assert harness.heads.used == []
        assert [status for status, _ in answers(output)] != ["HTTP/1.1 200 OK"]


def test_a_known_head_behind_an_unfinished_request_waits_its_turn(harness: Harness) -> None:
    """Behind a request on the ASGI path (a percent-encoded path is decoded there), the known
    head is not answered before it: the answers go out in order."""
    harness.exchange([HEAD])
    encoded = HEAD.replace(b"getSeries", b"get%53eries")
    output = harness.exchange([encoded + HEAD])
    assert harness.heads.used == []
    assert answers(output) == [("HTTP/1.1 200 OK", "HIT")] * 2


def test_after_an_upgrade_request_the_parser_decides(harness: Harness) -> None:
    """After a request to upgrade the connection, whatever follows goes to the parser (here
    uvicorn answers both requests as plain ones), never to the known heads."""
    harness.exchange([HEAD])
    upgrade = HEAD.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    output = harness.exchange([upgrade, HEAD])
    assert harness.heads.used == []
    assert answers(output) == [("HTTP/1.1 200 OK", "HIT")] * 2


def test_the_credentials_are_checked_for_every_known_head(harness: Harness) -> None:
    """Identity is asked for on each request, known head or not: when the access rules refuse
    the credentials of a learnt head, the shortcut does not answer it (the full path decides)."""
    harness.exchange([HEAD])
    access = harness.app.access
    asked: list[str] = []

    def refusing(headers: Any, address: str) -> None:
        asked.append(address)
        return None

    before = harness.app.shortcut_hits
    access.quick_principal = refusing  # type: ignore[method-assign]
    try:
        output = harness.exchange([HEAD])
    finally:
        del access.quick_principal
    assert harness.heads.used == [HEAD]  # looked up, then declined
    assert asked == ["127.0.0.1", "127.0.0.1"]  # by the known head's path, then the parser's
    assert harness.app.shortcut_hits == before
    assert answers(output) == [("HTTP/1.1 200 OK", "HIT")]  # by the ASGI path (open mode)


def test_a_stale_copy_is_not_answered_from_the_known_head(harness: Harness) -> None:
    harness.exchange([HEAD])
    assert harness.app.cached is not None
    memo = harness.app.cached.memo
    digest = harness.heads[HEAD].digest
    entry = memo.fresh_entry(digest)
    assert entry is not None
    entry.expires_at = 0.0  # as if its lifetime were over
    before = harness.app.shortcut_hits
    output = harness.exchange([HEAD])
    assert harness.heads.used == [HEAD]  # looked up, then declined
    assert harness.app.shortcut_hits == before  # the full path answered
    assert answers(output)[0][0] == "HTTP/1.1 200 OK"


def parse(data: bytes) -> tuple[list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]], bool]:
    """A fresh httptools parse of ``data``: the requests (method, url, headers) it finished,
    and whether any byte was left in an unfinished one."""

    class Sink:
        def __init__(self) -> None:
            self.done: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = []
            self.open = False
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []

        def on_message_begin(self) -> None:
            self.open, self.url, self.headers = True, b"", []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_message_complete(self) -> None:
            self.done.append((parser.get_method(), self.url, self.headers))
            self.open = False

    sink = Sink()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        return sink.done, True
    return sink.done, sink.open


def check_known(data: bytes, known: KnownHead) -> None:
    """What a fresh parse of ``data`` says is the request ``known`` describes, and nothing else."""
    done, unfinished = parse(data)
    assert not unfinished and len(done) == 1
    method, url, headers = done[0]
    parsed = httptools.parse_url(url)
    assert method == b"GET"
    assert (parsed.path.decode("ascii"), parsed.query or b"") == (known.path, known.query)
    assert headers == known.headers


_PIECES = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xff",
    b":",
    b"%",
    b"?",
    b"/",
    b"a",
    b"GET",
    b"HTTP/1.0",
    b"Host: other\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n",
    b"Connection: Upgrade\r\nUpgrade: h2c\r\n",
    b"Expect: 100-continue\r\n",
    b"Cache-Control: no-cache\r\n",
    b"X-Forwarded-For: 10.0.0.9\r\n",
    b" folded\r\n",
    b"0\r\n\r\n",
    b"hello",
    HEAD,
]


@st.composite
def variants(draw: st.DrawFn) -> bytes:
    """The known head with a few pieces put in, taken out or written over, anywhere."""
    data = HEAD
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        piece = draw(st.sampled_from(_PIECES))
        cut = draw(st.integers(0, 3))
        data = data[:at] + piece + data[at + cut :]
    return data


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=variants(), split=st.integers(0, 200))
@example(data=HEAD + HEAD, split=0)
@example(data=HEAD + b"\r\n", split=0)
@example(data=b"\r\n" + HEAD, split=0)
@example(data=HEAD.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\nhello"), split=0)
@example(data=HEAD.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), split=0)
@example(data=HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"), split=0)
def test_whenever_the_parser_is_skipped_httptools_parses_the_same_request(
    harness: Harness, data: bytes, split: int
) -> None:
    """Each variant is sent twice on one connection (it may be learnt the first time and
    answered from its known parse the second), and split at some byte on another. Every read
    answered without the parser must parse, freshly, to exactly its known request; and the
    first connection must answer the same as a connection on which nothing is known."""
    for head, known in list(harness.heads.items()):
        check_known(head, known)
    harness.heads.used.clear()
    output = harness.exchange([data, data])
    for used in harness.heads.used:
        check_known(used, harness.heads[used])
    harness.exchange([data[:split], data[split:]])
    for used in harness.heads.used:
        check_known(used, harness.heads[used])
    # The same connection again with the known heads put aside: the parser decides alone.
    saved = dict(harness.heads)
    harness.heads.clear()
    try:
        harness.app.cached.memo.learn = lambda head, known: None  # type: ignore[method-assign, union-attr]
        reference = harness.exchange([data, data])
    finally:
        del harness.app.cached.memo.learn  # type: ignore[union-attr]
        harness.heads.update(saved)
    # Statuses, not X-Cache: the first connection may have stored what the second finds.
    assert [status for status, _ in answers(output)] == [status for status, _ in answers(reference)]


def test_known_heads_have_their_audit_lines_with_the_client_a_trusted_proxy_names(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    """The audit line of a hit answered from a known head is the shortcut's line; the client is
    the one X-Forwarded-For names only when the connection comes from a trusted proxy."""
    log = tmp_path / "audit.log"
    harness = Harness(tmp_path, nbia_upstream.url, audit_log=str(log), trusted_proxies=["10.0.0.1"])
    try:
        forwarded = HEAD.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
        harness.exchange([forwarded])  # MISS, through the ASGI path
        harness.exchange([forwarded], peer="10.0.0.1")  # the shortcut: learnt
        harness.exchange([forwarded, forwarded], peer="10.0.0.1")  # known
        harness.exchange([forwarded], peer="10.0.0.2")  # known, from an untrusted peer
        assert harness.heads.used == [forwarded] * 3
        harness.app.audit.flush()
        lines = [json.loads(line) for line in log.read_text().splitlines()]
    finally:
        harness.close()
    assert [(line["client"], line["cache"]) for line in lines] == [
        ("127.0.0.1", "MISS"),
        ("192.0.2.7", "HIT"),
        ("192.0.2.7", "HIT"),
        ("192.0.2.7", "HIT"),
        ("10.0.0.2", "HIT"),
    ]
    first = lines[1]
    for line in lines[2:]:
        assert {k: v for k, v in line.items() if k not in ("time", "ms", "client")} == {
            k: v for k, v in first.items() if k not in ("time", "ms", "client")
        }
        assert line["ms"] > 0 and line["outcome"] == "ok" and line["bytes"] > 1000
    assert first["path"] == PATH and first["query"] == QUERY and first["user"] == "anonymous"

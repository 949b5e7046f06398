"""The request path's small parts, without sockets: the hit memo, the stored answer, the
token endpoints' spellings and the request body's bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.cache.answer import HIT, STALE, send_stored, stored_answer
from proxy.cache.policy import make_key, origin
from proxy.cache.store import Entry
from proxy.endpoints import lookup
from proxy.errors import ClientError
from proxy.hit_memo import QUERY_LIMIT, HitMemo
from proxy.request_body import read_body
from proxy.token_endpoints import LocalEndpoint, local_endpoint

PATH = "/nbia-api/services/v4/getSeries"


class FakeCache:
    """The part of TieredCache the memo and the stored answer use."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.entries: dict[str, Entry] = {}
        self.counted: list[tuple[str, bool]] = []
        self.used: list[str] = []

    def clock(self) -> float:
        return self.now

    def from_memory(self, digest: str) -> Entry | None:
        return self.entries.get(digest)

    def count(self, endpoint: str, hit: bool) -> None:
        self.counted.append((endpoint, hit))

    def served(self, digest: str) -> None:
        self.used.append(digest)


def entry_for(digest: str, *, created: float, expires: float, status: int = 200) -> Entry:
    headers = [(b"content-type", b"application/json")]
    return Entry(digest, PATH, status, headers, b'[{"a":1}]', created, expires)


def key_for(collection: str) -> Any:
    endpoint = lookup(PATH)
    assert endpoint is not None
    return make_key(
        origin("https", "nbia.example", ""),
        "nbia",
        "anonymous",
        "GET",
        endpoint,
        [("Collection", collection)],
    )


def test_memo_answers_a_remembered_plain_get_while_fresh() -> None:
    cache = FakeCache()
    memo = HitMemo(cache)  # type: ignore[arg-type]
    key = key_for("A")
    cache.entries[key.digest] = entry_for(key.digest, created=900.0, expires=1_100.0)
    assert memo.fresh(PATH, b"Collection=A", []) is None  # not remembered yet
    memo.remember(PATH, b"Collection=A", "GET", b"", key)
    assert memo.fresh(PATH, b"Collection=A", [(b"accept", b"*/*")]) is cache.entries[key.digest]
    assert memo.fresh(PATH, b"Collection=B", []) is None
    cache.now = 1_100.0  # expired: the full path decides
    assert memo.fresh(PATH, b"Collection=A", []) is None


@pytest.mark.parametrize(
    "header", [b"cache-control", b"pragma", b"content-length", b"transfer-encoding"]
)
def test_memo_sends_a_body_or_no_cache_down_the_full_path(header: bytes) -> None:
    cache = FakeCache()
    memo = HitMemo(cache)  # type: ignore[arg-type]
    key = key_for("A")
    cache.entries[key.digest] = entry_for(key.digest, created=900.0, expires=1_100.0)
    memo.remember(PATH, b"Collection=A", "GET", b"", key)
    assert memo.fresh(PATH, b"Collection=A", [(header, b"x")]) is None


def test_memo_remembers_only_plain_gets_and_stays_bounded() -> None:
    cache = FakeCache()
    memo = HitMemo(cache, limit=3)  # type: ignore[arg-type]
    key = key_for("A")
    cache.entries[key.digest] = entry_for(key.digest, created=900.0, expires=1_100.0)
    memo.remember(PATH, b"a=1", "POST", b"", key)
    memo.remember(PATH, b"b=1", "GET", b"body", key)
    memo.remember(PATH, b"c" * (QUERY_LIMIT + 1), "GET", b"", key)
    assert memo.fresh(PATH, b"a=1", []) is None
    assert memo.fresh(PATH, b"b=1", []) is None
    assert memo.fresh(PATH, b"c" * (QUERY_LIMIT + 1), []) is None
    for i in range(4):
        memo.remember(PATH, b"n=%d" % i, "GET", b"", key)
    # The oldest is forgotten first; the others stay (the memo never empties itself).
    assert memo.fresh(PATH, b"n=0", []) is None
    assert all(memo.fresh(PATH, b"n=%d" % i, []) is not None for i in (1, 2, 3))


def test_stored_answer_is_the_same_on_both_paths() -> None:
    cache = FakeCache()
    entry = entry_for("d1", created=958.4, expires=2_000.0)
    answer = stored_answer(cache, entry)  # type: ignore[arg-type]
    assert (answer.mark, answer.age) == (HIT, 41)
    assert cache.counted == [(PATH, True)] and cache.used == ["d1"]
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(send_stored(send, answer))
    head, body = answer.wire().split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    wire_headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    assert wire_headers == sent[0]["headers"] == answer.headers
    assert (b"x-cache", b"HIT") in answer.headers and (b"age", b"41") in answer.headers
    assert (b"content-length", b"9") in answer.headers
    assert body == sent[1]["body"] == entry.body


def test_a_stale_answer_is_marked_and_not_counted_as_a_hit() -> None:
    cache = FakeCache()
    entry = entry_for("d2", created=0.0, expires=10.0, status=200)
    answer = stored_answer(cache, entry, STALE)  # type: ignore[arg-type]
    assert (b"x-cache", b"STALE") in answer.headers and (b"age", b"1000") in answer.headers
    assert b"\r\nx-cache: STALE\r\nage: 1000\r\n\r\n" in answer.wire()
    assert cache.counted == [] and cache.used == []


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nbia-api/oauth/token", LocalEndpoint.TOKEN),
        ("/nbia-api/oauth/token/", LocalEndpoint.TOKEN),
        ("//nbia-api//oauth/token", LocalEndpoint.TOKEN),
        ("/NBIA-API/OAuth/Token", LocalEndpoint.TOKEN),
        ("/nbia-api/services/oauth/token", LocalEndpoint.TOKEN),
        ("/nbia-api/logout", LocalEndpoint.LOGOUT),
        ("/nbia-api/services/logout/", LocalEndpoint.LOGOUT),
        ("/nbia-api/services/v4/getSeries", None),
        ("/nbia-api/oauth/tokens", None),
    ],
)
def test_local_endpoints_in_every_spelling(path: str, expected: LocalEndpoint | None) -> None:
    assert local_endpoint(path) is expected


def receiver(*chunks: bytes, disconnect: bool = False) -> Any:
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect:
        messages[-1]["more_body"] = True
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        if not messages:
            await asyncio.sleep(3600)  # a client that stops sending
        return messages.pop(0)

    return receive


def test_request_body_is_read_whole() -> None:
    body = asyncio.run(read_body([], receiver(b"a=1", b"&b=2"), 100, 5.0))
    assert body == b"a=1&b=2"


@pytest.mark.parametrize(
    ("headers", "chunks", "disconnect", "timeout", "status"),
    [
        ([(b"content-length", b"101")], [b""], False, 5.0, 413),  # declared too large
        ([], [b"x" * 60, b"x" * 41], False, 5.0, 413),  # found too large while reading
        ([], [b"x"], True, 5.0, 499),  # the client went away
        ([], [], False, 0.05, 408),  # the body never arrives
    ],
)
def test_request_body_bounds(
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    disconnect: bool,
    timeout: float,
    status: int,
) -> None:
    receive = receiver(*chunks, disconnect=disconnect) if chunks else receiver()
    with pytest.raises(ClientError) as raised:
        asyncio.run(read_body(headers, receive, 100, timeout))
    assert raised.value.status == status

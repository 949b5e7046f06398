"""Answering from the store: the one place a stored answer is written to a client.

:func:`stored_answer` turns an entry into what the client receives (the stored status, headers
and body, plus ``X-Cache`` and ``Age``) and records a hit; the ASGI path sends it with
:func:`send_stored`, the protocol shortcut (:mod:`proxy.hit_protocol`) writes
:meth:`StoredAnswer.wire` to the socket in one call. The shortcut only decides whether it can
answer now; what it answers is the same.
"""

from __future__ import annotations

import http
from dataclasses import dataclass

from starlette.types import Send

from proxy.cache.store import Entry
from proxy.cache.tiers import TieredCache
from proxy.headers import RawHeaders

#: The ``X-Cache`` values of answers from the store.
HIT = b"HIT"
STALE = b"STALE"


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """A stored entry as it goes to the client, marked ``HIT`` or ``STALE`` with its age."""

    entry: Entry
    mark: bytes
    age: int

    @property
    def headers(self) -> RawHeaders:
        return [*self.entry.wire_headers, (b"x-cache", self.mark), (b"age", b"%d" % self.age)]

    def wire(self) -> bytes:
        """The whole HTTP/1.1 response as bytes (the status line and stored headers are
        rendered once per entry and kept on it)."""
        return b"%sx-cache: %s\r\nage: %d\r\n\r\n%s" % (
            response_head(self.entry),
            self.mark,
            self.age,
            self.entry.body,
        )


def stored_answer(cache: TieredCache, entry: Entry, mark: bytes = HIT) -> StoredAnswer:
    """The answer for ``entry``; a ``HIT`` is counted for its endpoint and marks it used."""
    return StoredAnswer(entry, mark, answer_age(cache, entry, mark))


def answer_age(cache: TieredCache, entry: Entry, mark: bytes = HIT) -> int:
    """The ``Age`` of an answer from ``entry`` now, in whole seconds; a ``HIT`` is counted for
    its endpoint and marks it used. (What :func:`stored_answer` does but the allocation: the
    protocol shortcut renders a hit's bytes from the age alone.)"""
    age = max(0, int(cache.clock() - entry.created_at))
    if mark == HIT:
        cache.count(entry.endpoint, hit=True)
        cache.served(entry.digest)
    return age


async def send_stored(send: Send, answer: StoredAnswer) -> None:
    """Send ``answer`` on the ASGI path."""
    entry = answer.entry
    await send({"type": "http.response.start", "status": entry.status, "headers": answer.headers})
    await send({"type": "http.response.body", "body": entry.body})


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>`` with its line end."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


def response_head(entry: Entry) -> bytes:
    """Status line and stored headers (with Content-Length), computed once per entry."""
    if entry.wire_head is None:
        lines = [status_line(entry.status)]
        lines += [name + b": " + value + b"\r\n" for name, value in entry.wire_headers]
        entry.wire_head = b"".join(lines)
    return entry.wire_head

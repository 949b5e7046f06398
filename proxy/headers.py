"""Which headers cross the gateway, in each direction.

Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are dropped both ways.
Towards the upstream the gateway also drops the client's credentials (``Authorization``,
``Cookie``) because upstream identity is the service account's alone; towards the client it
drops ``Set-Cookie`` because an upstream session belongs to that same account.
"""

from __future__ import annotations

from collections.abc import Iterable

RawHeaders = list[tuple[bytes, bytes]]

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Host and Content-Length are recomputed for the upstream connection.
# Expect: 100-continue was settled between the client and the gateway already.
_NOT_FORWARDED = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"authorization",
    b"cookie",
    b"expect",
}
_NOT_RETURNED = _HOP_BY_HOP | {b"set-cookie", b"content-length"}


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` are hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def _keep(headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> RawHeaders:
    pairs = list(headers)
    extra = _connection_tokens(pairs)
    return [(n, v) for n, v in pairs if n.lower() not in dropped and n.lower() not in extra]


def for_upstream(client_headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """End-to-end request headers to send upstream, minus the client's credentials."""
    return _keep(client_headers, _NOT_FORWARDED)


def for_client(upstream_headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """End-to-end response headers to return; Content-Length is set by the caller."""
    return _keep(upstream_headers, _NOT_RETURNED)


def find(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the first value of ``name`` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None

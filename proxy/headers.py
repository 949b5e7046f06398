"""Which headers cross the gateway, in each direction.

Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are dropped both ways.
Towards the upstream the gateway also drops the client's credentials (``Authorization``,
``Cookie``) because upstream identity is the service account's alone; towards the client it
drops ``Set-Cookie`` because an upstream session belongs to that same account.

Whatever is forwarded must be a well-formed field line (RFC 9110 §5.1, §5.5): a header the
gateway cannot send as received is the client's 400, never an upstream failure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.errors import ClientError

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

# RFC 9110: field-name = token; field-value = visible characters (and obs-text), with spaces
# and tabs only between them. No CR, LF or NUL (they would end or split the line), no other
# control characters, no leading or trailing whitespace (h11 refuses to send those;
# for_upstream strips them first).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[ \t]*[\x21-\x7e\x80-\xff])*)?")


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
    """End-to-end request headers to send upstream, minus the client's credentials.

    Leading and trailing spaces and tabs are not part of a field value (RFC 9110 §5.5, and
    Tomcat drops them too), so they are dropped rather than refused. Raises
    :class:`~proxy.errors.ClientError` (400) for a header that still cannot be sent.
    """
    kept = [(n, v.strip(b" \t")) for n, v in _keep(client_headers, _NOT_FORWARDED)]
    problem = malformed(kept)
    if problem is not None:
        raise ClientError(problem)
    return kept


def check_forwardable(client_headers: Iterable[tuple[bytes, bytes]]) -> None:
    """The 400 of :func:`for_upstream`, raised before the cache or coalescing see the request."""
    for_upstream(client_headers)


def malformed(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with the first header that is not a valid field line, else None.

    The message names the header, never its value (it may be a secret).
    """
    for name, value in headers:
        if not _FIELD_NAME.fullmatch(name):
            return "a header name is not a valid HTTP token"
        if not _FIELD_VALUE.fullmatch(value):
            return (
                f"header {name.decode('ascii').lower()} has a control character or stray "
                "whitespace; the gateway cannot forward it"
            )
    return None


def for_client(upstream_headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    """End-to-end response headers to return; Content-Length is set by the caller."""
    return _keep(upstream_headers, _NOT_RETURNED)


def find(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the first value of ``name`` (lower-case), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None

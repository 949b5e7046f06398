"""How far a cache key describes what the upstream reads of a request: pure rules, no I/O.

NBIA's JAX-RS resources read ``@QueryParam`` from the query string only and ``@FormParam`` (or a
form map) from an ``application/x-www-form-urlencoded`` body only; a GET resource never reads a
body, and Tomcat answers 400 to a request head over 8 KB before any resource runs. A key holds
the query and the form apart (:func:`proxy.cache.policy.make_key`); the rules here say what the
cache may do with a request under that key:

* ``REFUSED``: a GET or HEAD with a body. NBIA would ignore the parameters in it and answer as if
  they were not there; the client gets a 400 naming the problem instead.
* ``UNCACHED``: the key could not describe what the upstream reads (a POST body that is not a
  plain UTF-8 form, an encoded body, a method the endpoint does not have). Forwarded and relayed;
  the cache is neither read nor written.
* ``CACHED``: answered from the cache, and a 200 is stored (it is what the key's parameters
  produce), but something outside the key may still change an error answer (fields in the query
  of a POST resource, which reads only its form; a request head near Tomcat's limit). Errors are
  relayed, never stored, and the upstream request is not shared with concurrent ones.
* ``EXACT``: the key alone determines the answer: 400/404 are stored too and concurrent identical
  requests share one upstream request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from enum import IntEnum

from proxy.endpoints import Endpoint

#: Tomcat's default maxHttpHeaderSize: the request line plus headers NBIA accepts.
UPSTREAM_HEAD_LIMIT = 8192
#: Room for what the proxies in front of Tomcat add (X-Forwarded-*, Via, trace ids).
UPSTREAM_HEAD_MARGIN = 1024

FORM_TYPE = "application/x-www-form-urlencoded"
_WITHOUT_BODY = frozenset({"GET", "HEAD"})


class Fit(IntEnum):
    """What the cache may do with a request, from least to most (see the module docstring)."""

    REFUSED = 0
    UNCACHED = 1
    CACHED = 2
    EXACT = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    """A request's :class:`Fit` and, below ``EXACT``, why (the refusal's message for a 400)."""

    fit: Fit
    reason: str = ""


def classify(
    endpoint: Endpoint,
    method: str,
    query: bytes,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    head_bytes: int,
) -> Verdict:
    """How far the key of ``method endpoint?query`` with ``body`` describes the request.

    ``head_bytes`` is the size of the request head as it will be forwarded (:func:`head_size`),
    without the service token, which the store-time check (:func:`storable`) adds.
    """
    if method in _WITHOUT_BODY and body:
        return Verdict(
            Fit.REFUSED,
            f"a {method} request must not have a body: NBIA ignores it, so its parameters "
            "would be lost; send them in the query string",
        )
    if not endpoint.cacheable:
        return Verdict(Fit.UNCACHED, "the endpoint is never cached")
    return _keyed(endpoint, method, query, body, headers, head_bytes)


def classify_download(
    endpoint: Endpoint,
    method: str,
    query: bytes,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    head_bytes: int,
) -> Verdict:
    """:func:`classify` for a binary endpoint's download, which the series cache keeps
    (:mod:`proxy.binary`) under the same key rules; a HEAD is keyed as its GET."""
    if method in _WITHOUT_BODY and body:
        return classify(endpoint, method, query, body, headers, head_bytes)
    if not endpoint.payload.is_binary:
        return Verdict(Fit.UNCACHED, "not a binary endpoint")
    read = "GET" if method == "HEAD" else method
    return _keyed(endpoint, read, query, body, headers, head_bytes)


def _keyed(
    endpoint: Endpoint,
    method: str,
    query: bytes,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    head_bytes: int,
) -> Verdict:
    if method not in endpoint.methods or method not in ("GET", "POST"):
        return Verdict(Fit.UNCACHED, f"{endpoint.path} does not answer {method}")
    verdict = Verdict(Fit.EXACT)
    if method == "POST":
        verdict = _form_fit(query, body, headers)
    if verdict.fit is Fit.EXACT and not head_fits(head_bytes):
        return Verdict(Fit.CACHED, "the request head is near NBIA's 8 KB limit")
    return verdict


def _form_fit(query: bytes, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> Verdict:
    """A POST resource reads its form: a body NBIA may read otherwise than the key is uncached."""
    types: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            types.append(value)
        elif lowered == b"content-encoding" and value.strip().lower() != b"identity":
            return Verdict(Fit.UNCACHED, "the body has a content encoding")
    if len(types) > 1:
        return Verdict(Fit.UNCACHED, "more than one Content-Type")
    if types and not is_form(types[0]):
        return Verdict(Fit.UNCACHED, "the body is not a UTF-8 form")
    if not types and body:
        return Verdict(Fit.UNCACHED, "a body without a Content-Type")
    if not types:
        # An empty form, as the key says, but NBIA sees no form type: its errors may differ.
        return Verdict(Fit.CACHED, "no form Content-Type")
    if query:
        return Verdict(Fit.CACHED, "parameters in the query of a resource that reads its form")
    return Verdict(Fit.EXACT)


def is_form(content_type: bytes) -> bool:
    """The media type is exactly the form type (any case), with no parameter but UTF-8's charset.

    Jersey compares type and subtype only, and decodes the form in the given charset: a form
    in another charset would mean other parameters than the key's UTF-8 reading of the bytes.
    """
    message = Message()
    message["content-type"] = content_type.decode("latin-1")
    if message.get_content_type() != FORM_TYPE:
        return False
    for name, value in (message.get_params() or [])[1:]:
        if not name and not value:
            continue  # a trailing ";"
        if name.lower() != "charset" or str(value).lower() != "utf-8":
            return False
    return True


def head_size(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of an HTTP/1.1 request head: request line, ``name: value`` lines, blank line."""
    line = len(method) + 1 + len(target) + len(b" HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in headers) + 2


def head_fits(head_bytes: int) -> bool:
    """The head is clear of NBIA's limit, with room for what proxies on the way add."""
    return head_bytes <= UPSTREAM_HEAD_LIMIT - UPSTREAM_HEAD_MARGIN


def storable(status: int, fit: Fit, sent_head_bytes: int | None) -> bool:
    """May an answer with ``status`` be stored under the key of a request of this fit?

    A 200 is what the key's parameters produce; an error only when the key alone determined it:
    an ``EXACT`` request whose head as sent (service token included; None: unknown) was clear
    of the limit. Whether the status is storable at all is :func:`policy.lifetime`'s question.
    """
    if fit < Fit.CACHED:
        return False
    if status == 200:
        return True
    return fit is Fit.EXACT and sent_head_bytes is not None and head_fits(sent_head_bytes)

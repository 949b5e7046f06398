"""Pure byte-range decisions for a kept file: which status, which bytes, which headers.

No I/O here. A kept file has a known size and a strong ETag (its sha256), so the rules of
RFC 9110 §14 apply in full:

- ``Range`` is honoured for GET only (§14.2: HEAD and other methods ignore it); a HEAD gets
  the headers a GET would get, without the body.
- One range (``bytes=a-b``, ``bytes=a-``, suffix ``bytes=-n``) gives ``206`` with
  ``Content-Range``; an end past the file is cut to its last byte, a suffix longer than the file
  means the whole file.
- A header that does not parse, or names another unit, is ignored (``200``, whole file), as
  §14.2 allows; so is a header on an empty file, where no range can be named.
- Several ranges: the gateway does not send ``multipart/byteranges``; it answers as nginx does
  past its ``max_ranges`` ("processed as if there were no byte ranges specified"): ``200``,
  whole file. Every client that asks for several ranges can read a whole answer.
- No range of a parsed set is satisfiable (``bytes=500-`` of a 100-byte file, ``bytes=-0``):
  ``416`` with ``Content-Range: bytes */N``.
- ``If-Range``: the Range is honoured only when it holds the file's ETag, compared strongly
  (a weak ``W/`` tag never matches, nor does a date: kept files send no Last-Modified);
  otherwise the whole file (``200``). Without ``Range`` it is ignored (§13.1.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.headers import RawHeaders

_DIGITS = re.compile(rb"[0-9]+")


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send: ``status``, the ``length`` bytes from ``start`` (when ``body``), and the
    framing headers (Content-Length, Content-Range, Accept-Ranges, ETag)."""

    status: int
    start: int
    length: int
    headers: RawHeaders
    body: bool

    @property
    def end(self) -> int:
        """One past the last byte sent."""
        return self.start + self.length


def etag_for(sha256: str) -> bytes:
    """The strong ETag of a kept file: its sha256 in quotes."""
    return b'"' + sha256.encode("ascii") + b'"'


def plan(
    size: int,
    etag: bytes,
    *,
    method: bytes = b"GET",
    range_header: bytes | None = None,
    if_range: bytes | None = None,
) -> Plan:
    """The answer to a GET or HEAD of a kept file of ``size`` bytes with this ``etag``."""
    common: RawHeaders = [(b"accept-ranges", b"bytes"), (b"etag", etag)]
    body = method.upper() != b"HEAD"
    wanted = None
    if range_header is not None and method.upper() == b"GET" and size > 0:
        if if_range is None or _strong_match(if_range, etag):
            wanted = parse(range_header, size)
    if wanted is None:
        return Plan(200, 0, size, [(b"content-length", b"%d" % size), *common], body)
    if isinstance(wanted, _Unsatisfiable):
        headers = [(b"content-length", b"0"), (b"content-range", b"bytes */%d" % size), *common]
        return Plan(416, 0, 0, headers, False)
    start, length = wanted
    content_range = b"bytes %d-%d/%d" % (start, start + length - 1, size)
    headers = [(b"content-length", b"%d" % length), (b"content-range", content_range), *common]
    return Plan(206, start, length, headers, body)


class _Unsatisfiable:
    def __repr__(self) -> str:
        return "UNSATISFIABLE"


#: What :func:`parse` returns for a valid Range header no byte of the file satisfies.
UNSATISFIABLE = _Unsatisfiable()


def parse(header: bytes, size: int) -> tuple[int, int] | _Unsatisfiable | None:
    """``(start, length)`` of the one range ``header`` asks of a ``size``-byte file;
    :data:`UNSATISFIABLE` when no range it names lies in the file; None when the header is to
    be ignored (it does not parse, names another unit, or asks for several ranges)."""
    unit, equals, spec_list = header.partition(b"=")
    if not equals or unit.strip(b" \t").lower() != b"bytes":
        return None
    # range-set = 1#range-spec: a list, so empty elements and spaces around commas are allowed.
    specs = [part.strip(b" \t") for part in spec_list.split(b",")]
    specs = [spec for spec in specs if spec]
    if not specs:
        return None
    if len(specs) != 1:
        return None  # several ranges: the whole file, as nginx past max_ranges (see above)
    first, dash, last = specs[0].partition(b"-")
    if not dash or (first and not _DIGITS.fullmatch(first)):
        return None
    if last and not _DIGITS.fullmatch(last):
        return None
    if not first:
        return _suffix(int(last), size) if last else None  # "-" alone does not parse
    if not last:
        return _from(int(first), size)
    start, end = int(first), int(last)
    if end < start:
        return None  # invalid, not unsatisfiable (§14.1.1)
    return _from(start, size, end)


def _suffix(count: int, size: int) -> tuple[int, int] | _Unsatisfiable:
    if count == 0:
        return UNSATISFIABLE
    count = min(count, size)
    return size - count, count


def _from(start: int, size: int, end: int | None = None) -> tuple[int, int] | _Unsatisfiable:
    if start >= size:
        return UNSATISFIABLE
    last = size - 1 if end is None else min(end, size - 1)
    return start, last - start + 1


def _strong_match(validator: bytes, etag: bytes) -> bool:
    # Strong comparison (§8.8.3.2): both tags strong and identical; a date never matches.
    return validator.strip(b" \t") == etag and not etag.startswith(b"W/")

"""Range planning for kept files (RFC 9110 §14, §13.1.5): a table, no sockets."""

from __future__ import annotations

import pytest

from proxy.binary.ranges import UNSATISFIABLE, etag_for, parse, plan

ETAG = etag_for("ab" * 32)
SIZE = 1000

# (Range header, expected status, start, length, Content-Range or None)
CASES = [
    # no Range, or one to ignore: the whole file
    (None, 200, 0, 1000, None),
    (b"bytes=abc", 200, 0, 1000, None),
    (b"bytes=5", 200, 0, 1000, None),  # no dash
    (b"bytes=-", 200, 0, 1000, None),
    (b"bytes=", 200, 0, 1000, None),
    (b"bytes=,", 200, 0, 1000, None),
    (b"bytes 0-1", 200, 0, 1000, None),  # no "="
    (b"items=0-1", 200, 0, 1000, None),  # another unit
    (b"bytes=5-2", 200, 0, 1000, None),  # last before first: invalid, not unsatisfiable
    (b"bytes=+1-2", 200, 0, 1000, None),
    (b"bytes=1 -2", 200, 0, 1000, None),
    (b"bytes=0x10-", 200, 0, 1000, None),
    (b"bytes=-1-2", 200, 0, 1000, None),
    # several ranges: the whole file (no multipart), also when one is unsatisfiable
    (b"bytes=0-1,5-6", 200, 0, 1000, None),
    (b"bytes=0-1, 2000-", 200, 0, 1000, None),
    # one range
    (b"bytes=0-0", 206, 0, 1, b"bytes 0-0/1000"),
    (b"bytes=0-499", 206, 0, 500, b"bytes 0-499/1000"),
    (b"bytes=500-999", 206, 500, 500, b"bytes 500-999/1000"),
    (b"bytes=500-5000", 206, 500, 500, b"bytes 500-999/1000"),  # end cut to the last byte
    (b"bytes=999-", 206, 999, 1, b"bytes 999-999/1000"),
    (b"bytes=0-", 206, 0, 1000, b"bytes 0-999/1000"),
    (b"bytes=-1", 206, 999, 1, b"bytes 999-999/1000"),
    (b"bytes=-300", 206, 700, 300, b"bytes 700-999/1000"),
    (b"bytes=-5000", 206, 0, 1000, b"bytes 0-999/1000"),  # suffix longer than the file
    (b"Bytes=1-2", 206, 1, 2, b"bytes 1-2/1000"),  # the unit is case-insensitive
    (b"bytes = 1-2", 206, 1, 2, b"bytes 1-2/1000"),
    (b"bytes=1-2,", 206, 1, 2, b"bytes 1-2/1000"),  # empty list elements are allowed
    (b"bytes=00010-00019", 206, 10, 10, b"bytes 10-19/1000"),
    # nothing satisfiable
    (b"bytes=1000-", 416, 0, 0, b"bytes */1000"),
    (b"bytes=1000-2000", 416, 0, 0, b"bytes */1000"),
    (b"bytes=-0", 416, 0, 0, b"bytes */1000"),
    (b"bytes=99999999999999999999999-", 416, 0, 0, b"bytes */1000"),
]


@pytest.mark.parametrize(("header", "status", "start", "length", "content_range"), CASES)
def test_range_table(
    header: bytes | None, status: int, start: int, length: int, content_range: bytes | None
) -> None:
    result = plan(SIZE, ETAG, range_header=header)
    headers = dict(result.headers)
    assert (result.status, result.start, result.length) == (status, start, length)
    assert headers.get(b"content-range") == content_range
    assert headers[b"content-length"] == b"%d" % length
    assert headers[b"accept-ranges"] == b"bytes"
    assert headers[b"etag"] == ETAG
    assert result.body == (status != 416)
    assert result.end == start + length


@pytest.mark.parametrize(
    ("if_range", "status"),
    [
        (ETAG, 206),
        (b" " + ETAG + b" ", 206),
        (b"W/" + ETAG, 200),  # weak: never matches a strong comparison
        (etag_for("cd" * 32), 200),  # another file's tag: the client's copy is stale
        (b"Tue, 01 Dec 2026 12:00:00 GMT", 200),  # a date: kept files have no Last-Modified
        (b"", 200),
    ],
)
def test_if_range(if_range: bytes, status: int) -> None:
    result = plan(SIZE, ETAG, range_header=b"bytes=10-19", if_range=if_range)
    assert result.status == status
    assert (result.start, result.length) == ((10, 10) if status == 206 else (0, SIZE))


def test_if_range_without_range_is_ignored() -> None:
    assert plan(SIZE, ETAG, if_range=b"W/x").status == 200


def test_if_range_does_not_save_an_unsatisfiable_range_from_a_stale_tag() -> None:
    # A stale validator means "send me the whole new file", even for a range past its end.
    stale = plan(SIZE, ETAG, range_header=b"bytes=5000-", if_range=etag_for("cd" * 32))
    assert stale.status == 200 and stale.length == SIZE
    assert plan(SIZE, ETAG, range_header=b"bytes=5000-", if_range=ETAG).status == 416


def test_head_gets_the_get_headers_without_a_body_and_ignores_range() -> None:
    head = plan(SIZE, ETAG, method=b"HEAD")
    assert (head.status, head.body) == (200, False)
    assert dict(head.headers)[b"content-length"] == b"1000"
    ranged = plan(SIZE, ETAG, method=b"HEAD", range_header=b"bytes=0-9")
    assert (ranged.status, ranged.length, ranged.body) == (200, SIZE, False)
    assert plan(SIZE, ETAG, method=b"head", range_header=b"bytes=0-9").body is False


def test_other_methods_ignore_range() -> None:
    assert plan(SIZE, ETAG, method=b"POST", range_header=b"bytes=0-9").status == 200


def test_an_empty_file_is_sent_whole() -> None:
    for header in (b"bytes=0-", b"bytes=-5", b"bytes=-0"):
        result = plan(0, ETAG, range_header=header)
        assert (result.status, result.length) == (200, 0)
        assert dict(result.headers)[b"content-length"] == b"0"


def test_parse_edges() -> None:
    assert parse(b"bytes=0-0", 1) == (0, 1)
    assert parse(b"bytes=1-", 1) is UNSATISFIABLE
    assert parse(b"bytes=-1", 1) == (0, 1)
    assert parse(b"bytes=0-1,2-3", 10) is None
    assert parse(b"bytes=\t3-4\t", 10) == (3, 2)


def test_etag_is_the_quoted_sha256() -> None:
    assert etag_for("0" * 64) == b'"' + b"0" * 64 + b'"'

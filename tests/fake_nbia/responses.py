"""Replies and the server's generic output rules (formats, empty results, errors)."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .images import StreamedZip

SERVER_ERROR = "Server was not able to process your request"
Row = Mapping[str, object]


@dataclass
class Reply:
    """What a handler answers. A Path body (or stream=True) is sent chunked."""

    status: int = 200
    body: bytes | Path | HugeJson | StreamedZip = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: bool = False
    zip: bool = False  # a binary zip download: subject to cut_stream


@dataclass
class HugeJson:
    """A JSON answer far larger than any real metadata answer, generated as it is sent."""

    n_bytes: int
    path_contains: str
    declare_length: bool

    def reply(self) -> Reply:
        headers = [("content-length", str(self.n_bytes))] if self.declare_length else []
        return Reply(200, self, "application/json", headers, stream=True)

    def pieces(self, size: int) -> Iterator[bytes]:
        """The body in pieces of about ``size``: ``[``, records, padding, ``{}]``."""
        record = b'{"SeriesInstanceUID":"1.3.6.1.4.1.14519.5.2.1.99","Collection":"Huge"},'
        block = record * max(1, size // len(record))
        left = self.n_bytes - 4  # "[" and "{}]"
        yield b"["
        while left > len(block):
            yield block
            left -= len(block)
        yield b" " * left + b"{}]"


class ApiError(Exception):
    """Raised by handlers to answer with `reply` (an error the real server would give)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def text(body: str, status: int = 200, content_type: str = "text/plain") -> Reply:
    return Reply(status, body.encode(), content_type)


def empty(status: int = 200) -> Reply:
    """Response.ok().build(): no entity, no Content-Type."""
    return Reply(status)


def server_error(message: str | None = "null") -> ApiError:
    """The UncaughtException mapper: 500 text/plain with the exception message."""
    body = SERVER_ERROR if message is None else f"{SERVER_ERROR}\n{message}"
    return ApiError(text(body, 500))


def bad_request(message: str) -> ApiError:
    """400s are plain sentences, but typed application/json like the resources."""
    return ApiError(text(message, 400, "application/json"))


def missing(name: str) -> ApiError:
    return bad_request(f"A parameter, {name}, is required for this API call.")


def unauthorized() -> ApiError:
    return ApiError(empty(401))


def no_access(series_uid: str, public_api: bool = False) -> ApiError:
    if public_api:
        return bad_request(
            f"Image with given SeriesInstanceUID,{series_uid}, is not in public domain."
        )
    return bad_request(
        f"The user has not been granted the access to image with given "
        f"SeriesInstanceUID,{series_uid}. Please contact System Admin to "
        "resolve this issue."
    )


def dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_reply(value: object) -> Reply:
    return Reply(200, dumps(value), "application/json")


# --- format=json|csv|html|xml|csvquoted|csv-download -----------------------

SINGLE_FORMATS = ("json", "csv", "html", "xml")
MULTI_FORMATS = SINGLE_FORMATS + ("csvquoted", "csv-download")


def check_format(fmt: str | None, multi_column: bool) -> str:
    """The format to use; anything unknown is the server's generic 500."""
    fmt = fmt or "json"
    if fmt not in (MULTI_FORMATS if multi_column else SINGLE_FORMATS):
        raise server_error(None)
    return fmt


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def _quoted(value: object) -> str:
    return '"' + _cell(value).replace('"', '""') + '"'


def _xml_type(value: object) -> str:
    if isinstance(value, bool):
        return "java.lang.Boolean"
    if isinstance(value, int):
        return "java.lang.Long" if abs(value) > 2**31 - 1 else "java.lang.Integer"
    return "java.lang.String"


def rows_reply(
    rows: Sequence[Row], columns: Sequence[str], fmt: str | None, multi_column: bool = True
) -> Reply:
    """formatResponse(): an empty result is a bare 200; nulls never reach the output."""
    fmt = check_format(fmt, multi_column)
    if not rows:
        return empty()
    if fmt == "json":
        data = [{c: r[c] for c in columns if r.get(c) is not None} for r in rows]
        return json_reply(data)
    if fmt == "csv":
        lines = [",".join(columns)] + [",".join(_cell(r.get(c)) for c in columns) for r in rows]
        return Reply(200, ("\n".join(lines) + "\n").encode(), "text/csv")
    if fmt in ("csvquoted", "csv-download"):
        lines = [",".join(_quoted(c) for c in columns)]
        lines += [",".join(_quoted(r.get(c)) for c in columns) for r in rows]
        reply = Reply(200, ("\n".join(lines) + "\n").encode(), "text/csv")
        if fmt == "csv-download":
            reply.headers.append(
                ("content-disposition", 'attachment; filename="SeriesMetaData.csv"')
            )
        return reply
    if fmt == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>"
            + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns)
            + "</tr>\n"
            for r in rows
        )
        page = f"<table>\n<tr>{head}</tr>\n{body}</table>\n"
        return Reply(200, page.encode(), "text/html")
    # xml
    out = ["<Results>"]
    for r in rows:
        cols = "".join(
            f"<Col type='{_xml_type(r.get(c))}'>{html.escape(_cell(r.get(c)))}</Col>"
            for c in columns
        )
        out.append(f"<Row>{cols}</Row>")
    out.append("</Results>")
    return Reply(200, "".join(out).encode(), "application/xml")

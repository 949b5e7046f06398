"""What a check of a downloaded image payload concludes, and the interface every check has."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

#: Why a payload was refused. A fixed set, so callers can count and alert on each.
Reason = Literal[
    "truncated",  # the bytes end before the format does
    "bad_zip",  # not a zip, or its parts disagree (central directory vs local headers)
    "crc_mismatch",  # an entry's bytes do not match its CRC-32
    "md5_mismatch",  # an image's bytes do not match the MD5 md5hashes.csv (or NBIA) lists
    "md5_list_missing",  # the endpoint always writes md5hashes.csv and this zip has none
    "bad_md5_list",  # md5hashes.csv is not NBIA's "Filename,MD5Hash" list
    "count_mismatch",  # image entries != the series' ObjectCount
    "size_mismatch",  # the images' uncompressed bytes != the series' TotalSizeInBytes
    "limit_exceeded",  # more entries, longer names or more bytes than the check accepts
    "not_dicom",  # no DICM preamble
    "not_jpeg",  # not a complete JPEG (SOI ... EOI)
]

#: How much was checked: ``full`` against NBIA's numbers (getSeriesSize, an MD5 from NBIA),
#: ``self`` only the payload's own consistency (zip complete and CRC-clean, a DICM preamble).
Level = Literal["full", "self"]


@dataclass(frozen=True, slots=True)
class EntryDigest:
    """One zip entry as streamed: name, uncompressed size, CRC-32, MD5 (None if not hashed)."""

    name: str
    size: int
    crc32: int
    md5: str | None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a check. ``reason`` is None exactly when ``ok``."""

    ok: bool
    reason: Reason | None
    message: str
    level: Level
    #: whether image MD5s were compared with a list (md5hashes.csv or NBIA's MD5)
    md5_checked: bool = False
    #: the image entries of a zip (LICENSE and md5hashes.csv left out), in stream order
    images: tuple[EntryDigest, ...] = field(default=(), repr=False)

    @classmethod
    def failed(cls, reason: Reason, message: str, level: Level = "self") -> Verdict:
        return cls(False, reason, message, level)


class Check(Protocol):
    """An incremental check: ``feed`` the body's bytes in order, then ``finish`` once.

    Not thread-safe, but holds no thread affinity: one worker thread may drive it (zlib and
    hashlib release the GIL on large buffers, so that thread runs beside the event loop).
    ``feed`` never raises for any input; after a failure it ignores further bytes.
    """

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Verdict: ...

    @property
    def failure(self) -> Verdict | None:
        """The failed verdict as soon as one is certain (before ``finish``), else None."""
        ...

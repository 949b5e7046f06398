"""Single-image answers checked as they stream: a DICOM file has its DICM preamble, a JPEG
is complete (starts with SOI, ends with EOI), a DICOM's MD5 is NBIA's when NBIA gave one."""

from __future__ import annotations

import hashlib

from proxy.binary.verdict import Verdict

PREAMBLE_END = 132  # 128 bytes of preamble, then b"DICM"
DICM = b"DICM"
SOI = b"\xff\xd8"
EOI = b"\xff\xd9"


class DicomCheck:
    """A Part-10 DICOM answer (getSingleImage, getDCMImage); see :class:`~.verdict.Check`.

    ``expect_md5`` (NBIA's getMD5HashForImage value) may be called any time before ``finish``;
    with it the verdict is ``full``, without it ``self``.
    """

    def __init__(self, md5: str | None = None) -> None:
        self._head = bytearray()
        self._md5 = hashlib.md5()
        self._expected: str | None = None
        self._size = 0
        self._failure: Verdict | None = None
        if md5 is not None:
            self.expect_md5(md5)

    def expect_md5(self, md5: str) -> None:
        self._expected = md5.strip().lower()

    @property
    def failure(self) -> Verdict | None:
        return self._failure

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None:
            return
        self._size += len(chunk)
        if len(self._head) < PREAMBLE_END:
            self._head += chunk[: PREAMBLE_END - len(self._head)]
            if len(self._head) == PREAMBLE_END and self._head[128:] != DICM:
                self._failure = Verdict.failed("not_dicom", "no DICM marker at byte 128")
                return
        self._md5.update(chunk)

    def finish(self) -> Verdict:
        if self._failure is not None:
            return self._failure
        if len(self._head) < PREAMBLE_END:
            return Verdict.failed("not_dicom", f"{self._size} bytes: shorter than a DICOM preamble")
        if self._expected is None:
            return Verdict(True, None, f"DICOM, {self._size} bytes", "self")
        got = self._md5.hexdigest()
        if got != self._expected:
            return Verdict.failed("md5_mismatch", f"MD5 {got}, NBIA lists {self._expected}", "full")
        return Verdict(True, None, f"DICOM, {self._size} bytes, MD5 as NBIA's", "full", True)


class JpegCheck:
    """A JPEG answer (getThumbnail): SOI first, EOI last; see :class:`~.verdict.Check`.

    Only the first two and the last two bytes are kept. Level is always ``self``: NBIA
    publishes no size or hash for thumbnails.
    """

    def __init__(self) -> None:
        self._head = b""
        self._tail = b""
        self._size = 0
        self._failure: Verdict | None = None

    @property
    def failure(self) -> Verdict | None:
        return self._failure

    def feed(self, chunk: bytes) -> None:
        if self._failure is not None or not chunk:
            return
        self._size += len(chunk)
        if len(self._head) < 2:
            self._head = (self._head + chunk[:2])[:2]
            if len(self._head) == 2 and self._head != SOI:
                self._failure = Verdict.failed("not_jpeg", "no JPEG start-of-image marker")
                return
        self._tail = (self._tail + chunk[-2:])[-2:]

    def finish(self) -> Verdict:
        if self._failure is not None:
            return self._failure
        # SOI + EOI alone is 4 bytes; anything shorter has no room for both
        if self._size < 4 or self._head != SOI:
            return Verdict.failed("not_jpeg", f"{self._size} bytes: not a JPEG")
        if self._tail != EOI:
            return Verdict.failed("not_jpeg", "no JPEG end-of-image marker: truncated")
        return Verdict(True, None, f"JPEG, {self._size} bytes", "self")

"""A series zip checked as it streams, against its own structure and NBIA's numbers.

NBIA's zip writers catch their own errors and close the zip, so a broken download can be a
well-formed zip with fewer files (see series-cache-anchors.md §B2). :class:`ZipCheck` reads the
zip once, in order, as the bytes arrive, holding per-entry digests only:

* local headers, then each entry's data: STORED with its sizes, DEFLATED (inflated with a bound
  on the output), either with a data descriptor (flag bit 3, with or without its signature,
  ZIP64 sizes when large: what the JDK's ZipOutputStream writes);
* the CRC-32 of every entry and the MD5 of every image, over the uncompressed bytes;
* the central directory, ZIP64 end records and the end of central directory, which must agree
  with what was streamed (names, methods, sizes, CRCs, offsets, entry count) and end the bytes.

At :meth:`ZipCheck.finish` the images (every entry but ``LICENSE`` and ``md5hashes.csv``) are
compared with getSeriesSize's ``ObjectCount`` and ``TotalSizeInBytes`` when :meth:`ZipCheck.expect`
gave them (level ``full``; without them level ``self``: complete and CRC-clean only), and with the
MD5s ``md5hashes.csv`` lists. The CSV comes last, so every image is hashed on the way.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from proxy.binary.verdict import EntryDigest, Level, Reason, Verdict

LICENSE = b"LICENSE"
MD5_LIST = b"md5hashes.csv"
MD5_LIST_HEADER = "Filename,MD5Hash"

#: Whether the zip must carry md5hashes.csv: ``required`` (getImageWithMD5Hash, or getImage
#: asked with IncludeMD5=yes: NBIA always writes it then), ``optional`` (check it when present),
#: ``ignore`` (neither hash the images nor read the list: the fastest, CRC-only check).
Md5Policy = Literal["required", "optional", "ignore"]

DEFAULT_MAX_ENTRIES = 100_000  # the largest NBIA series hold a few thousand images
DEFAULT_MAX_BYTES = 64 * 1024**3  # uncompressed, all entries: far above any NBIA series
MAX_NAME = 4096
MAX_LICENSE = 1024 * 1024
MAX_MD5_LIST = 16 * 1024 * 1024  # ~60 bytes a row: room for DEFAULT_MAX_ENTRIES many times over
MAX_ZIP64_EXTENSIBLE = 64 * 1024
INFLATE_OUT = 1024 * 1024  # bytes inflated per step, so a deflate bomb never fills memory
INFLATE_IN = 256 * 1024  # compressed bytes handed to zlib per step

_LOC = struct.Struct("<4sHHHHHLLLHH")  # 30 bytes
_CEN = struct.Struct("<4sHHHHHHLLLHHHHHLL")  # 46 bytes
_EOCD = struct.Struct("<4sHHHHLLH")  # 22 bytes
_Z64_EOCD = struct.Struct("<4sQHHLLQQQQ")  # 56 bytes
_Z64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
_DD32 = struct.Struct("<LLL")
_DD64 = struct.Struct("<LQQ")
SIG_LOC = b"PK\x03\x04"
SIG_CEN = b"PK\x01\x02"
SIG_EOCD = b"PK\x05\x06"
SIG_Z64_EOCD = b"PK\x06\x06"
SIG_Z64_LOCATOR = b"PK\x06\x07"
SIG_DD = b"PK\x07\x08"
_SIG_DD_INT = int.from_bytes(SIG_DD, "little")
_U32 = 0xFFFFFFFF
#: the JDK writes a descriptor's sizes in 8 bytes once either is this large, ZIP64 extra or not
WIDE_DESCRIPTOR_AT = _U32
_U16 = 0xFFFF
FLAG_ENCRYPTED = 0x1
FLAG_DESCRIPTOR = 0x8
FLAG_UTF8 = 0x800
STORED = 0
DEFLATED = 8
ZIP64_EXTRA = 0x0001


class Inflater(Protocol):
    """A raw-deflate stream being inflated (``zlib.decompressobj``'s surface that is used)."""

    @property
    def eof(self) -> bool: ...
    @property
    def unconsumed_tail(self) -> bytes: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes | memoryview, max_length: int = ..., /) -> bytes: ...


def _zlib_inflater() -> Inflater:
    return zlib.decompressobj(-zlib.MAX_WBITS)


Crc32 = Callable[[bytes | memoryview, int], int]
crc32: Crc32 = zlib.crc32
new_inflater: Callable[[], Inflater] = _zlib_inflater
#: What corrupt deflate data raises.
INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
try:
    # ISA-L computes the same CRC-32 about 4 times faster than zlib (PCLMULQDQ) and inflates
    # about 1.4 times faster (bench.validation): the check was the cold download's largest
    # cost after the file's sha256.
    from isal import isal_zlib
except ImportError:  # pragma: no cover -- a platform without isal's wheels: zlib does it all
    pass
else:
    crc32 = isal_zlib.crc32

    def _isal_inflater() -> Inflater:
        return isal_zlib.decompressobj(-zlib.MAX_WBITS)

    new_inflater = _isal_inflater
    # (its stubs type the class as an instance)
    INFLATE_ERRORS = (zlib.error, cast(type[Exception], isal_zlib.error))


class _Fail(Exception):
    """A verdict found mid-parse; never leaves this module."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


@dataclass(slots=True)
class _Entry:
    """One entry: what its local header declared, and what its data turned out to be."""

    raw_name: bytes
    flags: int
    method: int
    offset: int  # of its local header
    declared_crc: int
    declared_csize: int
    declared_size: int
    zip64: bool  # the local header had a ZIP64 extra field: descriptor sizes are 8 bytes
    image: bool
    crc: int = 0
    csize: int = 0
    size: int = 0
    md5: bytes | None = None

    @property
    def name(self) -> str:
        return _decode_name(self.raw_name, self.flags)


def _decode_name(raw: bytes, flags: int) -> str:
    # as Python's zipfile does: UTF-8 when flagged, else the original IBM PC code page
    return raw.decode("utf-8", "replace") if flags & FLAG_UTF8 else raw.decode("cp437")


def _zip64_fields(extra: bytes, widths: list[int]) -> list[int] | None:
    """The ZIP64 values of the extra field, one per nonzero width (None: no ZIP64 field).

    The slots come in the spec's order (size, compressed size, offset: 8 bytes; disk: 4),
    present only for the fields whose narrow value is the all-ones marker.
    """
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4 : i + 4 + length]
        if len(body) < length:
            raise _Fail("bad_zip", "extra field runs past its header")
        if tag == ZIP64_EXTRA:
            values: list[int] = []
            at = 0
            for width in widths:
                if width:
                    if at + width > len(body):
                        raise _Fail("bad_zip", "ZIP64 extra field too short")
                    values.append(int.from_bytes(body[at : at + width], "little"))
                    at += width
            return values
        i += 4 + length
    return None


class ZipCheck:
    """Checks one series zip fed in order; see :class:`~proxy.binary.verdict.Check`.

    ``object_count``/``total_bytes`` (getSeriesSize) may be given here or by :meth:`expect` any
    time before :meth:`finish`. Memory is bounded by ``max_entries`` small digests plus
    md5hashes.csv (at most 16 MiB); inflated bytes are bounded by ``max_bytes`` and, once
    known, by ``total_bytes``, so a deflate bomb costs at most that much hashing.
    """

    def __init__(
        self,
        *,
        md5s: Md5Policy = "optional",
        object_count: int | None = None,
        total_bytes: int | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._md5s = md5s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._expected: tuple[int, int] | None = None
        self._failure: Verdict | None = None
        self._buf = bytearray()  # header bytes not parsed yet
        self._at = 0  # stream offset of the first byte of _buf (or of the next data byte)
        self._need = 4
        self._then = self._record
        self._phase: Literal["entries", "directory", "zip64", "end", "done"] = "entries"
        self._entries: list[_Entry] = []
        self._names: set[bytes] = set()
        self._images = 0
        self._image_bytes = 0
        self._total_bytes = 0
        self._csv = bytearray()
        # the entry whose data is streaming, and how
        self._current: _Entry | None = None
        self._md5: hashlib._Hash | None = None
        self._inflate: Inflater | None = None
        self._remaining = 0  # compressed bytes still due (entries of known size)
        self._scan_hold = b""  # stored entry of unknown size: bytes that may start a descriptor
        self._cd_start = -1
        self._cd_end = -1
        self._wide_descriptor = False
        self._cd_count = 0
        self._z64_at = -1
        self._z64: tuple[int, int, int, int] | None = None  # entries, cd size, cd offset, disk
        if object_count is not None and total_bytes is not None:
            self.expect(object_count, total_bytes)

    # --- the public surface ----------------------------------------------------------

    def expect(self, object_count: int, total_bytes: int) -> None:
        """NBIA's numbers for the series (getSeriesSize), whenever they arrive."""
        self._expected = (object_count, total_bytes)
        if self._failure is None:
            try:
                self._check_running_totals()
            except _Fail as fail:
                self._fail(fail)

    @property
    def failure(self) -> Verdict | None:
        return self._failure

    def feed(self, chunk: bytes) -> None:
        """The next bytes of the body. Never raises; a failure shows in :attr:`failure`."""
        if self._failure is not None or not chunk:
            return
        try:
            self._consume(memoryview(chunk))
        except _Fail as fail:
            self._fail(fail)
        except INFLATE_ERRORS as err:
            self._fail(_Fail("bad_zip", f"deflate data is corrupt: {err}"))

    def finish(self) -> Verdict:
        """The verdict on all the bytes fed (call once, after the last chunk)."""
        if self._failure is not None:
            return self._failure
        if self._phase != "done":
            where = "before its central directory" if self._phase == "entries" else "in its end"
            return self._fail(_Fail("truncated", f"the zip ends {where} at byte {self._fed()}"))
        try:
            return self._judge()
        except _Fail as fail:
            return self._fail(fail)

    # --- driving the parser ----------------------------------------------------------

    def _level(self) -> Level:
        return "full" if self._expected is not None else "self"

    def _fail(self, fail: _Fail) -> Verdict:
        self._failure = Verdict.failed(fail.reason, fail.message, self._level())
        self._buf = bytearray()
        self._inflate = None
        self._md5 = None
        return self._failure

    def _fed(self) -> int:
        return self._at + len(self._buf) + len(self._scan_hold)

    def _consume(self, view: memoryview) -> None:
        i, n = 0, len(view)
        while True:
            if self._current is not None:
                if i >= n:
                    return
                i += self._data(view[i:])
                continue
            if len(self._buf) >= self._need:
                self._then()
                continue
            if i >= n:
                return
            if self._phase == "done":
                raise _Fail("bad_zip", f"bytes after the end of central directory at {self._at}")
            take = min(self._need - len(self._buf), n - i)
            self._buf += view[i : i + take]
            i += take

    def _expect_record(self) -> None:
        self._need, self._then = 4, self._record

    def _take(self, count: int) -> bytes:
        """The first ``count`` bytes of the header buffer, consumed."""
        head = bytes(self._buf[:count])
        del self._buf[:count]
        self._at += count
        return head

    def _record(self) -> None:
        sig = bytes(self._buf[:4])
        phase = self._phase
        if sig == SIG_LOC and phase == "entries":
            self._need, self._then = _LOC.size, self._local_fixed
        elif sig == SIG_CEN and phase in ("entries", "directory"):
            if phase == "entries":
                self._phase, self._cd_start = "directory", self._at
            self._need, self._then = _CEN.size, self._central_fixed
        elif sig == SIG_Z64_EOCD and phase in ("entries", "directory"):
            self._mark_directory_end()
            self._need, self._then = _Z64_EOCD.size, self._zip64_end_fixed
        elif sig == SIG_Z64_LOCATOR and phase == "zip64":
            self._need, self._then = _Z64_LOCATOR.size, self._zip64_locator
        elif sig == SIG_EOCD and phase in ("entries", "directory", "end"):
            if phase != "end":
                self._mark_directory_end()
            self._need, self._then = _EOCD.size, self._end_fixed
        else:
            raise _Fail("bad_zip", f"unexpected bytes {sig!r} at {self._at} ({phase})")

    # --- local headers and entry data ------------------------------------------------

    def _local_fixed(self) -> None:
        fields = _LOC.unpack_from(self._buf)
        name_len, extra_len = fields[9], fields[10]
        if name_len > MAX_NAME:
            raise _Fail("limit_exceeded", f"an entry name of {name_len} bytes")
        self._need, self._then = _LOC.size + name_len + extra_len, self._local_variable

    def _local_variable(self) -> None:
        offset = self._at
        head = self._take(self._need)
        _, _, flags, method, _, _, crc, csize, size, name_len, _ = _LOC.unpack_from(head)
        raw_name = head[_LOC.size : _LOC.size + name_len]
        extra = head[_LOC.size + name_len :]
        if flags & FLAG_ENCRYPTED:
            raise _Fail("bad_zip", f"entry {raw_name!r} is encrypted")
        if method not in (STORED, DEFLATED):
            raise _Fail("bad_zip", f"entry {raw_name!r} uses compression method {method}")
        if raw_name in self._names:
            raise _Fail("bad_zip", f"entry {raw_name!r} appears twice")
        if len(self._entries) >= self._max_entries:
            raise _Fail("limit_exceeded", f"more than {self._max_entries} entries")
        wide = _zip64_fields(extra, [8 * (size == _U32), 8 * (csize == _U32)])
        if wide is not None:
            if size == _U32:
                size = wide.pop(0)
            if csize == _U32:
                csize = wide.pop(0)
        image = raw_name not in (LICENSE, MD5_LIST)
        entry = _Entry(raw_name, flags, method, offset, crc, csize, size, wide is not None, image)
        self._entries.append(entry)
        self._names.add(raw_name)
        if image:
            self._images += 1
            self._check_running_totals()
            if self._md5s != "ignore":
                self._md5 = hashlib.md5()
        self._current = entry
        known = not flags & FLAG_DESCRIPTOR
        if method == DEFLATED:
            self._inflate = new_inflater()
            self._remaining = csize if known else -1
        elif known:
            if csize != size:
                raise _Fail("bad_zip", f"stored entry {raw_name!r} declares two sizes")
            self._remaining = size
        else:
            self._remaining = -1  # stored, size only in the descriptor: scan for it
        if self._remaining == 0:
            self._end_data()

    def _data(self, view: memoryview) -> int:
        """Entry data from ``view``; returns how many bytes belonged to the entry."""
        if self._inflate is not None:
            return self._inflate_data(view)
        if self._remaining >= 0:
            take = min(self._remaining, len(view))
            self._out(view[:take])
            self._current_entry().csize += take
            self._at += take
            self._remaining -= take
            if self._remaining == 0:
                self._end_data()
            return take
        return self._scan_stored(view)

    def _current_entry(self) -> _Entry:
        assert self._current is not None
        return self._current

    def _inflate_data(self, view: memoryview) -> int:
        inflate, entry = self._inflate, self._current_entry()
        assert inflate is not None
        limit = len(view) if self._remaining < 0 else min(self._remaining, len(view))
        piece = view[: min(limit, INFLATE_IN)]
        data: bytes | memoryview = piece
        while True:
            out = inflate.decompress(data, INFLATE_OUT)
            if out:
                self._out(out)
            if inflate.eof:
                break
            data = inflate.unconsumed_tail
            if not data and len(out) < INFLATE_OUT:
                break  # all input taken and no output held back
        # at the end, the input left over is unused_data (unconsumed_tail may still hold it too)
        left = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
        used = len(piece) - len(left)
        entry.csize += used
        self._at += used
        if self._remaining >= 0:
            self._remaining -= used
        if inflate.eof:
            if self._remaining > 0:
                raise _Fail("bad_zip", f"entry {entry.raw_name!r}: deflate data ends early")
            self._end_data()
        elif self._remaining == 0:
            raise _Fail("bad_zip", f"entry {entry.raw_name!r}: deflate data runs past its size")
        return used

    def _scan_stored(self, view: memoryview) -> int:
        """A stored entry of unknown size ends at a descriptor whose CRC and size match."""
        entry = self._current_entry()
        hold = self._scan_hold
        data = hold + bytes(view)
        length = 24 if entry.zip64 else 16
        start = 0
        while True:
            k = data.find(SIG_DD, start)
            if k < 0:
                keep = max(start, len(data) - 3)  # a signature may straddle the chunks
                self._commit_stored(data[start:keep])
                self._scan_hold = data[keep:]
                return len(view)
            self._commit_stored(data[start:k])
            if len(data) < k + length:
                self._scan_hold = data[k:]
                return len(view)
            layout = _DD64 if entry.zip64 else _DD32
            crc, csize, size = layout.unpack_from(data, k + 4)
            if csize == size == entry.size:
                if crc != entry.crc:
                    raise _Fail("crc_mismatch", f"entry {entry.raw_name!r}: CRC-32 does not match")
                self._scan_hold = b""
                self._at += length
                self._current = None
                self._md5_done(entry)
                self._expect_record()
                return k + length - len(hold)
            self._commit_stored(data[k : k + 4])  # the signature bytes were data
            start = k + 4

    def _commit_stored(self, piece: bytes) -> None:
        if piece:
            self._out(piece)
            self._current_entry().csize += len(piece)
            self._at += len(piece)

    def _out(self, piece: bytes | memoryview) -> None:
        """Uncompressed bytes of the current entry."""
        entry = self._current_entry()
        n = len(piece)
        entry.size += n
        entry.crc = crc32(piece, entry.crc)
        self._total_bytes += n
        if self._total_bytes > self._max_bytes:
            raise _Fail("limit_exceeded", f"more than {self._max_bytes} uncompressed bytes")
        if entry.image:
            self._image_bytes += n
            if self._md5 is not None:
                self._md5.update(piece)
            if self._expected is not None and self._image_bytes > self._expected[1]:
                self._check_running_totals()
        elif entry.raw_name == MD5_LIST:
            if len(self._csv) + n > MAX_MD5_LIST:
                raise _Fail("limit_exceeded", f"md5hashes.csv over {MAX_MD5_LIST} bytes")
            self._csv += piece
        elif entry.size > MAX_LICENSE:
            raise _Fail("limit_exceeded", f"LICENSE over {MAX_LICENSE} bytes")
        if self._remaining < 0 and self._inflate is None:
            return  # a scanned stored entry counts its compressed bytes itself
        if entry.flags & FLAG_DESCRIPTOR == 0 and entry.size > entry.declared_size:
            raise _Fail("bad_zip", f"entry {entry.raw_name!r} inflates past its declared size")

    def _check_running_totals(self) -> None:
        if self._expected is None:
            return
        count, total = self._expected
        if self._images > count:
            raise _Fail("count_mismatch", f"more than the {count} images getSeriesSize counts")
        if self._image_bytes > total:
            raise _Fail("size_mismatch", f"images over the {total} bytes getSeriesSize counts")

    def _md5_done(self, entry: _Entry) -> None:
        if self._md5 is not None:
            entry.md5 = self._md5.digest()
            self._md5 = None

    def _end_data(self) -> None:
        entry = self._current_entry()
        self._current = None
        self._inflate = None
        self._md5_done(entry)
        if entry.flags & FLAG_DESCRIPTOR:
            wide = (
                entry.zip64 or entry.csize >= WIDE_DESCRIPTOR_AT or entry.size >= WIDE_DESCRIPTOR_AT
            )
            self._wide_descriptor = wide
            self._need = 4 + (_DD64.size if wide else _DD32.size)
            self._then = self._descriptor
            return
        if entry.crc != entry.declared_crc:
            raise _Fail("crc_mismatch", f"entry {entry.raw_name!r}: CRC-32 does not match")
        if entry.size != entry.declared_size:
            raise _Fail("bad_zip", f"entry {entry.raw_name!r}: size differs from its header")
        self._expect_record()

    def _descriptor(self) -> None:
        entry = self._entries[-1]
        layout = _DD64 if self._wide_descriptor else _DD32
        head = bytes(self._buf[: self._need])
        # the signature is optional; a CRC equal to it is told apart by the CRC repeating
        signed = head[:4] == SIG_DD and (entry.crc != _SIG_DD_INT or head[4:8] == SIG_DD)
        length = layout.size + (4 if signed else 0)
        crc, csize, size = layout.unpack_from(head, 4 if signed else 0)
        self._take(length)
        if crc != entry.crc:
            raise _Fail("crc_mismatch", f"entry {entry.raw_name!r}: CRC-32 does not match")
        if (csize, size) != (entry.csize, entry.size):
            raise _Fail("bad_zip", f"entry {entry.raw_name!r}: data descriptor sizes differ")
        self._expect_record()

    # --- central directory and end records -------------------------------------------

    def _mark_directory_end(self) -> None:
        if self._phase == "entries":
            self._cd_start = self._at
        self._cd_end = self._at

    def _central_fixed(self) -> None:
        fields = _CEN.unpack_from(self._buf)
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        if name_len > MAX_NAME:
            raise _Fail("limit_exceeded", f"a central directory name of {name_len} bytes")
        self._need = _CEN.size + name_len + extra_len + comment_len
        self._then = self._central_variable

    def _central_variable(self) -> None:
        head = self._take(self._need)
        fields = _CEN.unpack_from(head)
        flags, method, crc, csize, size = fields[3], fields[4], fields[7], fields[8], fields[9]
        name_len, extra_len, disk, offset = fields[10], fields[11], fields[13], fields[16]
        raw_name = head[_CEN.size : _CEN.size + name_len]
        extra = head[_CEN.size + name_len : _CEN.size + name_len + extra_len]
        if self._cd_count >= len(self._entries):
            raise _Fail("bad_zip", f"the central directory lists {raw_name!r}, not in the zip")
        entry = self._entries[self._cd_count]
        self._cd_count += 1
        wanted = [size == _U32, csize == _U32, offset == _U32, disk == _U16]
        wide = _zip64_fields(extra, [8 * wanted[0], 8 * wanted[1], 8 * wanted[2], 4 * wanted[3]])
        if wide is not None:
            values = iter(wide)
            size = next(values) if wanted[0] else size
            csize = next(values) if wanted[1] else csize
            offset = next(values) if wanted[2] else offset
            disk = next(values) if wanted[3] else disk
        mine = (entry.raw_name, entry.method, entry.crc, entry.csize, entry.size, entry.offset, 0)
        if (raw_name, method, crc, csize, size, offset, disk) != mine:
            raise _Fail(
                "bad_zip", f"the central directory disagrees with the entry {entry.raw_name!r}"
            )
        if flags & FLAG_DESCRIPTOR != entry.flags & FLAG_DESCRIPTOR:
            raise _Fail("bad_zip", f"entry {entry.raw_name!r}: flags differ from its header")
        self._expect_record()

    def _zip64_end_fixed(self) -> None:
        record_size = _Z64_EOCD.unpack_from(self._buf)[1]
        if not 44 <= record_size <= 44 + MAX_ZIP64_EXTENSIBLE:
            raise _Fail("bad_zip", f"a ZIP64 end record of {record_size} bytes")
        self._need, self._then = 12 + record_size, self._zip64_end_variable

    def _zip64_end_variable(self) -> None:
        self._z64_at = self._at
        head = self._take(self._need)
        _, _, _, _, disk, cd_disk, here, entries, cd_size, cd_offset = _Z64_EOCD.unpack_from(head)
        if here != entries:
            raise _Fail("bad_zip", "the ZIP64 end record counts its entries twice, apart")
        self._z64 = (entries, cd_size, cd_offset, disk | cd_disk)
        self._phase = "zip64"
        self._expect_record()

    def _zip64_locator(self) -> None:
        _, disk, offset, disks = _Z64_LOCATOR.unpack(self._take(_Z64_LOCATOR.size))
        if offset != self._z64_at or disk != 0 or disks > 1:
            raise _Fail("bad_zip", "the ZIP64 locator points elsewhere")
        self._phase = "end"
        self._expect_record()

    def _end_fixed(self) -> None:
        self._need, self._then = _EOCD.size + _EOCD.unpack_from(self._buf)[7], self._end_variable

    def _end_variable(self) -> None:
        _, disk, cd_disk, here, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(
            self._take(self._need)
        )
        if here != entries:
            raise _Fail("bad_zip", "the end of central directory counts its entries twice, apart")
        if self._phase != "end" and self._z64 is not None:
            raise _Fail("bad_zip", "a ZIP64 end record without its locator")
        got = (entries, cd_size, cd_offset, disk | cd_disk)
        if self._z64 is not None:
            # ZIP64 values stand in for the markers; the others must agree with them
            z_entries, z_size, z_offset, z_disk = self._z64
            got = (
                z_entries if entries == _U16 else entries,
                z_size if cd_size == _U32 else cd_size,
                z_offset if cd_offset == _U32 else cd_offset,
                z_disk | (disk if disk != _U16 else 0) | (cd_disk if cd_disk != _U16 else 0),
            )
            if got != self._z64:
                raise _Fail("bad_zip", "the end records disagree")
        mine = (len(self._entries), self._cd_end - self._cd_start, self._cd_start, 0)
        if self._cd_count != len(self._entries) or got != mine:
            raise _Fail(
                "bad_zip",
                f"the end of central directory says {got[0]} entries in {got[1]} bytes at "
                f"{got[2]}; the zip has {len(self._entries)} ({self._cd_count} in its directory) "
                f"in {mine[1]} bytes at {mine[2]}",
            )
        self._phase = "done"
        self._need, self._then = 1, self._expect_record  # any further byte fails

    # --- the verdict -----------------------------------------------------------------

    def _judge(self) -> Verdict:
        images = [e for e in self._entries if e.image]
        level = self._level()
        if self._expected is not None:
            count, total = self._expected
            if len(images) != count:
                raise _Fail("count_mismatch", f"{len(images)} images; getSeriesSize counts {count}")
            if self._image_bytes != total:
                raise _Fail(
                    "size_mismatch",
                    f"{self._image_bytes} image bytes; getSeriesSize counts {total}",
                )
        listed = MD5_LIST in self._names
        if not listed and self._md5s == "required":
            raise _Fail("md5_list_missing", "no md5hashes.csv, which this download always has")
        checked = listed and self._md5s != "ignore"
        if checked:
            self._check_md5s(images)
        digests = tuple(
            EntryDigest(e.name, e.size, e.crc, e.md5.hex() if e.md5 is not None else None)
            for e in images
        )
        summary = f"{len(images)} images, {self._image_bytes} bytes"
        if level == "full":
            summary += ", as getSeriesSize counts"
        if checked:
            summary += ", MD5s as md5hashes.csv lists"
        return Verdict(True, None, summary, level, checked, digests)

    def _check_md5s(self, images: list[_Entry]) -> None:
        listed = parse_md5_list(bytes(self._csv))
        by_name = {e.name: e for e in images}
        for name, md5 in listed.items():
            entry = by_name.get(name)
            if entry is None:
                raise _Fail("md5_mismatch", f"md5hashes.csv lists {name!r}, not in the zip")
            if entry.md5 is None or entry.md5.hex() != md5:
                raise _Fail("md5_mismatch", f"{name!r} does not have the MD5 md5hashes.csv lists")


def parse_md5_list(data: bytes) -> dict[str, str]:
    """NBIA's md5hashes.csv: ``Filename,MD5Hash`` then ``name,<32 hex>`` rows, any order.

    Raises :class:`_Fail` (``bad_md5_list``) on anything else.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Fail("bad_md5_list", "md5hashes.csv is not UTF-8") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    if not lines or lines[0] != MD5_LIST_HEADER:
        raise _Fail("bad_md5_list", "md5hashes.csv does not start with Filename,MD5Hash")
    rows: dict[str, str] = {}
    for line in lines[1:]:
        name, comma, md5 = line.rpartition(",")
        md5 = md5.lower()
        if not comma or not name or len(md5) != 32 or md5.strip("0123456789abcdef"):
            raise _Fail("bad_md5_list", f"md5hashes.csv row {line[:80]!r}")
        if rows.setdefault(name, md5) != md5:
            raise _Fail("bad_md5_list", f"md5hashes.csv lists {name!r} twice")
    return rows

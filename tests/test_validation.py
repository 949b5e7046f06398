"""The series cache's checks of image payloads (proxy.binary): zips, DICOM, JPEG."""

from __future__ import annotations

import hashlib
import io
import random
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.binary import zipcheck
from proxy.binary.imagecheck import DicomCheck, JpegCheck
from proxy.binary.verdict import Check, Verdict
from proxy.binary.zipcheck import Md5Policy, ZipCheck
from tests.fake_nbia.dicom import make_jpeg


@pytest.fixture(scope="module", params=["fast", "zlib"], autouse=True)
def inflate_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every check twice: with the CRC-32 and inflater in use (ISA-L when installed) and with
    zlib's, the fallback where isal has no wheel."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "zlib":
            patch.setattr(zipcheck, "crc32", zlib.crc32)
            patch.setattr(zipcheck, "new_inflater", lambda: zlib.decompressobj(-zlib.MAX_WBITS))
            patch.setattr(zipcheck, "INFLATE_ERRORS", (zlib.error,))
        yield request.param


def test_the_fast_backend_is_isal(inflate_backend: str) -> None:
    """isal is a dependency: the check runs on ISA-L, not on zlib's slower CRC-32 and inflate."""
    from isal import isal_zlib

    if inflate_backend == "fast":
        assert zipcheck.crc32 is isal_zlib.crc32
        assert type(zipcheck.new_inflater()) is type(isal_zlib.decompressobj(-15))


class _Pipe(io.RawIOBase):
    """A non-seekable sink: zipfile then writes data descriptors (flag bit 3)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def _dicom(n: int, size: int = 3000) -> bytes:
    rng = random.Random(n)
    # half noise, half zeros: deflate has something to do either way
    body = rng.randbytes(size // 2) + bytes(size - size // 2)
    return bytes(128) + b"DICM" + body


def _images(count: int = 5) -> dict[str, bytes]:
    return {f"{n:08d}.dcm": _dicom(n, 1000 + 700 * n) for n in range(1, count + 1)}


def _csv(images: dict[str, bytes]) -> bytes:
    rows = [f"{name},{hashlib.md5(data).hexdigest()}\n" for name, data in images.items()]
    random.Random(7).shuffle(rows)  # HashMap order: any order goes
    return ("Filename,MD5Hash\n" + "".join(rows)).encode()


def make_zip(
    images: dict[str, bytes],
    *,
    method: int = zipfile.ZIP_STORED,
    stream: bool = False,
    license: bool = True,
    csv: bytes | None | bool = True,
    zip64: bool = False,
) -> bytes:
    """A series zip as NBIA lays it out: [LICENSE] + images [+ md5hashes.csv]."""
    sink: io.BytesIO | _Pipe = _Pipe() if stream else io.BytesIO()
    with zipfile.ZipFile(sink, "w", method) as zf:
        if license:
            zf.writestr("LICENSE", b"Creative Commons Attribution 4.0\n")
        for name, data in images.items():
            with zf.open(name, "w", force_zip64=zip64) as fh:
                fh.write(data)
        if csv is True:
            zf.writestr("md5hashes.csv", _csv(images))
        elif isinstance(csv, bytes):
            zf.writestr("md5hashes.csv", csv)
    return bytes(sink.data) if isinstance(sink, _Pipe) else sink.getvalue()


def _pieces(data: bytes, seed: int, largest: int = 5000) -> Iterable[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        n = rng.choice([1, 2, 3, rng.randint(1, largest), rng.randint(1, 64)])
        yield data[i : i + n]
        i += n


def run(check: Check, data: bytes, seed: int = 0, largest: int = 5000) -> Verdict:
    for piece in _pieces(data, seed, largest):
        check.feed(piece)
    return check.finish()


def zip_verdict(
    data: bytes,
    images: dict[str, bytes] | None = None,
    md5s: Md5Policy = "optional",
    seed: int = 0,
    **kwargs: int,
) -> Verdict:
    """The check of ``data``, with getSeriesSize's numbers taken from ``images`` if given."""
    check = ZipCheck(md5s=md5s, **kwargs)
    if images is not None:
        check.expect(len(images), sum(len(b) for b in images.values()))
    return run(check, data, seed)


LAYOUTS = [
    pytest.param(method, stream, license, csv, id=f"{label}-{how}-{lic}-{md5}")
    for method, label in ((zipfile.ZIP_STORED, "stored"), (zipfile.ZIP_DEFLATED, "deflated"))
    for stream, how in ((False, "seekable"), (True, "descriptors"))
    for license, lic in ((True, "license"), (False, "nolicense"))
    for csv, md5 in ((True, "md5"), (None, "nomd5"))
]


# --- zips that pass -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "stream", "license", "csv"), LAYOUTS)
def test_good_zip_passes(method: int, stream: bool, license: bool, csv: bool | None) -> None:
    images = _images()
    data = make_zip(images, method=method, stream=stream, license=license, csv=csv)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    for seed in range(3):
        full = zip_verdict(data, images, seed=seed)
        assert (full.ok, full.reason, full.level, full.md5_checked) == (
            True,
            None,
            "full",
            bool(csv),
        )
        assert [(d.name, d.size, d.md5) for d in full.images] == [
            (name, len(b), hashlib.md5(b).hexdigest()) for name, b in images.items()
        ]
        assert [d.crc32 for d in full.images] == [zlib.crc32(b) for b in images.values()]
        alone = zip_verdict(data, seed=seed)  # getSeriesSize empty or failing
        assert (alone.ok, alone.level) == (True, "self")


def test_one_byte_chunks() -> None:
    images = {"00000001.dcm": _dicom(1, 300), "00000002.dcm": _dicom(2, 200)}
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        for stream in (False, True):
            data = make_zip(images, method=method, stream=stream)
            check = ZipCheck(md5s="required", object_count=2, total_bytes=764)
            for i in range(len(data)):
                check.feed(data[i : i + 1])
            assert check.finish().ok


def test_inflating_in_small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Output bounded per step: entries end mid-step, output is held back, input left over."""
    images = _images()
    monkeypatch.setattr(zipcheck, "INFLATE_OUT", 777)
    monkeypatch.setattr(zipcheck, "INFLATE_IN", 3000)
    for stream in (False, True):
        data = make_zip(images, method=zipfile.ZIP_DEFLATED, stream=stream)
        for seed in range(4):
            verdict = zip_verdict(data, images, md5s="required", seed=seed)
            assert verdict.ok, verdict.message
        check = ZipCheck(md5s="required")
        check.feed(data)  # one piece: many steps per entry
        assert check.finish().ok


@pytest.mark.parametrize("stream", [False, True])
def test_zip64(stream: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(4)
    # ZIP64 extra fields in local headers (8-byte data descriptor sizes when streamed)
    data = make_zip(images, method=zipfile.ZIP_DEFLATED, stream=stream, zip64=True)
    assert zip_verdict(data, images, md5s="required").ok
    # ZIP64 end records and central directory offsets, as a multi-GB zip has them
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 2000)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 3)
    data = make_zip(images, stream=stream, zip64=True)
    monkeypatch.undo()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    verdict = zip_verdict(data, images, md5s="required")
    assert verdict.ok, verdict.message
    # the ZIP64 end record must agree with the directory it describes
    z64 = data.rindex(b"PK\x06\x06")
    bad = bytearray(data)
    bad[z64 + 32] ^= 1  # total entries
    assert zip_verdict(bytes(bad), images).reason == "bad_zip"


def _jdk_zip(images: dict[str, bytes], signature: bool, wide: bool = False) -> bytes:
    """DEFLATED entries with data descriptors, the signature optional (as the spec allows)."""
    out, central = bytearray(), bytearray()
    for name, data in images.items():
        raw, offset = name.encode(), len(out)
        packed = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = packed.compress(data) + packed.flush()
        crc = zlib.crc32(data)
        out += struct.pack("<4sHHHHHLLLHH", b"PK\x03\x04", 20, 8, 8, 0, 0, 0, 0, 0, len(raw), 0)
        out += raw + body
        out += (b"PK\x07\x08" if signature else b"") + struct.pack(
            "<LQQ" if wide else "<LLL", crc, len(body), len(data)
        )
        central += struct.pack(
            "<4sHHHHHHLLLHHHHHLL",
            *(b"PK\x01\x02", 20, 20, 8, 8, 0, 0, crc, len(body), len(data), len(raw), 0, 0),
            *(0, 0, 0, offset),
        )
        central += raw
    end = struct.pack(
        "<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(images), len(images), len(central), len(out), 0
    )
    return bytes(out + central + end)


@pytest.mark.parametrize("signature", [True, False])
def test_descriptor_with_or_without_signature(signature: bool) -> None:
    images = _images(3)
    data = _jdk_zip(images, signature)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    assert zip_verdict(data, images).ok
    bad = bytearray(data)
    first = len(next(iter(images))) + 30
    descriptor = data.index(b"PK\x03\x04", first) - 12  # the first entry's CRC field
    bad[descriptor] ^= 1
    assert zip_verdict(bytes(bad), images).reason == "crc_mismatch"


def test_descriptor_with_8_byte_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JDK widens a descriptor past 4 GiB without a ZIP64 extra in the local header."""
    images = _images(3)
    data = _jdk_zip(images, signature=True, wide=True)
    assert zip_verdict(data, images).reason == "bad_zip"  # small entries: 4-byte sizes expected
    monkeypatch.setattr(zipcheck, "WIDE_DESCRIPTOR_AT", 1000)  # as if these were over 4 GiB
    assert zip_verdict(data, images).ok


def test_empty_zip_passes_only_its_own_check() -> None:
    data = make_zip({}, license=False, csv=None)
    assert zip_verdict(data).ok
    assert zip_verdict(data, _images(1)).reason == "count_mismatch"


# --- zips that fail -----------------------------------------------------------------------


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("stream", [False, True])
def test_truncated_anywhere(method: int, stream: bool) -> None:
    images = _images(2)
    data = make_zip(images, method=method, stream=stream)
    assert zip_verdict(data, images).ok
    for end in range(len(data)):
        verdict = zip_verdict(data[:end], images, seed=end)
        assert (verdict.ok, verdict.reason) == (False, "truncated"), end


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_clean_close_after_fewer_images(method: int) -> None:
    """NBIA's writer failed mid-loop and closed the zip: fewer images and no md5hashes.csv."""
    images = _images(5)
    first = dict(list(images.items())[:3])
    data = make_zip(first, method=method, csv=None)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    verdict = zip_verdict(data, images)
    assert (verdict.ok, verdict.reason, verdict.level) == (False, "count_mismatch", "full")
    assert zip_verdict(data, md5s="required").reason == "md5_list_missing"
    assert zip_verdict(data).ok  # nothing else to tell: the caller records it as checked less


def test_more_images_than_counted_fails_early() -> None:
    images = _images(4)
    data = make_zip(images, csv=None)
    check = ZipCheck(object_count=2, total_bytes=10**9)
    check.feed(data[: len(data) // 2 + 3000])
    assert check.failure is not None and check.failure.reason == "count_mismatch"
    # numbers that arrive after the bytes count as well
    late = ZipCheck()
    late.feed(data)
    late.expect(2, 10**9)
    assert late.failure is not None and late.finish().reason == "count_mismatch"


@pytest.mark.parametrize("delta", [1, -1])
def test_sizes_off(delta: int) -> None:
    images = _images()
    data = make_zip(images)
    check = ZipCheck(object_count=len(images), total_bytes=sum(map(len, images.values())) + delta)
    assert run(check, data).reason == "size_mismatch"


@pytest.mark.parametrize("stream", [False, True])
def test_flipped_byte_in_an_entry(stream: bool) -> None:
    images = _images()
    data = make_zip(images, stream=stream, csv=None)
    target = list(images.values())[2]
    at = data.index(target) + len(target) // 3
    bad = bytearray(data)
    bad[at] ^= 0x40
    verdict = zip_verdict(bytes(bad), images)
    assert (verdict.ok, verdict.reason) == (False, "crc_mismatch")
    assert "00000003.dcm" in verdict.message
    early = ZipCheck()
    early.feed(bytes(bad[: data.index(b"00000004.dcm")]))  # known once the entry is over
    assert early.failure is not None and early.failure.reason == "crc_mismatch"


def test_flipped_byte_in_deflated_data() -> None:
    images = _images()
    data = make_zip(images, method=zipfile.ZIP_DEFLATED, stream=True)
    start = data.index(b"00000003.dcm") + len("00000003.dcm")
    for offset in range(5, 400, 37):
        bad = bytearray(data)
        bad[start + offset] ^= 0x01
        # corrupt deflate data either fails to inflate or inflates to other bytes
        assert zip_verdict(bytes(bad), images).reason in ("bad_zip", "crc_mismatch")


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_image_off_its_listed_md5(method: int) -> None:
    images = _images()
    listed = _csv(images)
    changed = dict(images)
    data = bytearray(images["00000004.dcm"])
    data[-1] ^= 0xFF
    changed["00000004.dcm"] = bytes(data)
    zip_bytes = make_zip(changed, method=method, csv=listed)
    assert zipfile.ZipFile(io.BytesIO(zip_bytes)).testzip() is None  # CRCs of the bytes sent
    verdict = zip_verdict(zip_bytes, images, md5s="required")
    assert (verdict.ok, verdict.reason) == (False, "md5_mismatch")
    assert "00000004.dcm" in verdict.message
    # md5s="ignore" hashes nothing and reads no list: the CRC-only check cannot see it
    ignored = zip_verdict(zip_bytes, images, md5s="ignore")
    assert ignored.ok and not ignored.md5_checked and ignored.images[0].md5 is None


def test_md5_lists_nbia_does_not_write() -> None:
    images = _images(3)
    ghost = _csv(images) + b"00000009.dcm," + b"0" * 32 + b"\n"
    assert zip_verdict(make_zip(images, csv=ghost), images).reason == "md5_mismatch"
    for csv in (
        b"",
        b"Name,Hash\n",
        _csv(images).replace(b",", b";"),
        _csv(images) + b"00000001.dcm,nothex\n",
        _csv(images) + b"00000001.dcm," + b"0" * 32 + b"\n",  # listed twice, two MD5s
        b"Filename,MD5Hash\n\xff\n",
    ):
        assert zip_verdict(make_zip(images, csv=csv), images).reason == "bad_md5_list", csv
    # \r\n line ends and upper-case hex are read the same
    crlf = re.sub(rb"[0-9a-f]{32}", lambda m: m[0].upper(), _csv(images).replace(b"\n", b"\r\n"))
    assert zip_verdict(make_zip(images, csv=crlf), images, md5s="required").ok


def _central_directory(data: bytes) -> int:
    end = data.rindex(b"PK\x05\x06")
    offset: int = struct.unpack_from("<L", data, end + 16)[0]
    return offset


@pytest.mark.parametrize(
    ("field", "size"),
    [(16, 4), (20, 4), (24, 4), (42, 4), (46, 1), (10, 2)],
    ids=["crc", "csize", "size", "offset", "name", "method"],
)
def test_central_directory_disagreeing_with_local_headers(field: int, size: int) -> None:
    images = _images(3)
    data = make_zip(images, method=zipfile.ZIP_DEFLATED)
    cd = _central_directory(data) + 46 + len("LICENSE")  # the second record: 00000001.dcm
    assert data[cd : cd + 4] == b"PK\x01\x02"
    bad = bytearray(data)
    bad[cd + field] ^= 0x02 if size == 2 else 0x01
    verdict = zip_verdict(bytes(bad), images)
    assert (verdict.ok, verdict.reason) == (False, "bad_zip"), verdict.message


def test_end_records_that_lie() -> None:
    images = _images(3)
    data = make_zip(images)
    end = data.rindex(b"PK\x05\x06")
    for field in (4, 8, 10, 12, 16):  # disk, entries here, entries, directory size, offset
        bad = bytearray(data)
        bad[end + field] ^= 0x01
        assert zip_verdict(bytes(bad), images).reason == "bad_zip", field
    assert zip_verdict(data + b"\0", images).reason == "bad_zip"  # bytes after the end
    cd = _central_directory(data)
    dropped = data[:cd] + data[data.index(b"PK\x01\x02", cd + 4) :]  # a directory record gone
    assert zip_verdict(dropped, images).reason == "bad_zip"


def test_not_zips() -> None:
    for data in (b"", b"PK", b"<html>Server was not able to process your request</html>"):
        verdict = zip_verdict(data, _images())
        assert not verdict.ok and verdict.reason in ("truncated", "bad_zip")
    assert zip_verdict(b"\x00" * 100).reason == "bad_zip"
    encrypted = bytearray(make_zip(_images(1)))
    encrypted[6] |= 1
    assert zip_verdict(bytes(encrypted)).reason == "bad_zip"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_any_bytes_give_a_verdict(data: bytes) -> None:
    verdict = zip_verdict(data)
    assert not verdict.ok or data.startswith(b"PK\x05\x06")  # only an empty zip passes


_SAMPLE = make_zip(_images(3), method=zipfile.ZIP_DEFLATED, stream=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)), max_size=4))
def test_damaged_zips_give_a_verdict(edits: list[tuple[int, int]]) -> None:
    bad = bytearray(_SAMPLE)
    for at, value in edits:
        bad[at] = value
    images = _images(3)
    verdict = zip_verdict(bytes(bad), images, md5s="required")
    if verdict.ok:  # only bytes the check does not cover changed (times, versions)
        assert [d.md5 for d in verdict.images] == [
            hashlib.md5(b).hexdigest() for b in images.values()
        ]


def test_deflate_bomb_is_bounded() -> None:
    images = {"00000001.dcm": bytes(100 * 1024 * 1024)}
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("00000001.dcm", images["00000001.dcm"])
    data = sink.getvalue()
    assert len(data) < 1024 * 1024
    check = ZipCheck(object_count=1, total_bytes=1_000_000)
    check.feed(data[:5000])
    assert check.failure is not None and check.failure.reason == "size_mismatch"
    capped = ZipCheck(max_bytes=10 * 1024 * 1024)
    capped.feed(data)
    assert capped.finish().reason == "limit_exceeded"
    lying = bytearray(data)  # a local header that claims 1000 bytes
    lying[22:26] = struct.pack("<L", 1000)
    check = ZipCheck()
    check.feed(bytes(lying[:2000]))
    assert check.failure is not None and check.failure.reason == "bad_zip"


def test_entry_and_name_limits() -> None:
    images = _images(5)
    assert zip_verdict(make_zip(images), max_entries=4).reason == "limit_exceeded"
    assert zip_verdict(make_zip(images), max_entries=7).ok
    long_name = {"x" * 5000: b"data"}
    assert zip_verdict(make_zip(long_name)).reason == "limit_exceeded"
    one = make_zip({"a.dcm": b"1"}, license=False, csv=None)
    local = one[: one.index(b"PK\x01\x02")]
    assert zip_verdict(local + local).reason == "bad_zip"  # the same name twice


# --- single images --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_any_bytes_give_an_image_verdict(data: bytes, largest: int) -> None:
    dicom = run(DicomCheck(), data, largest=largest)
    assert dicom.ok == (len(data) >= 132 and data[128:132] == b"DICM")
    jpeg = run(JpegCheck(), data, largest=largest)
    assert jpeg.ok == (len(data) >= 4 and data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9")


def test_dicom() -> None:
    good = _dicom(1, 5000)
    assert run(DicomCheck(), good, largest=50).level == "self"
    md5 = hashlib.md5(good).hexdigest()
    verdict = run(DicomCheck(md5.upper()), good)
    assert (verdict.ok, verdict.level, verdict.md5_checked) == (True, "full", True)
    late = DicomCheck()
    late.feed(good)
    late.expect_md5(md5)
    assert late.finish().ok
    assert run(DicomCheck("0" * 32), good).reason == "md5_mismatch"
    for bad in (b"", good[:131], bytes(128) + b"DICX" + good[132:], b"<html>error</html>" * 20):
        assert run(DicomCheck(), bad, largest=7).reason == "not_dicom"


def test_jpeg() -> None:
    good = make_jpeg(3)
    for seed in range(5):
        assert run(JpegCheck(), good, seed=seed, largest=9).ok
    one = JpegCheck()
    for i in range(len(good)):
        one.feed(good[i : i + 1])
    assert one.finish().ok
    for bad in (b"", b"\xff", b"\xff\xd8\xff", good[:-1], good[:40], b"GIF89a" + good, b"\xff\xd9"):
        assert run(JpegCheck(), bad, largest=3).reason == "not_jpeg", bad[:8]

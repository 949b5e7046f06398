"""Throughput of the series zip check (proxy.binary.zipcheck) on synthetic series zips.

Run on purpose (not part of the test suite)::

    .venv/bin/python -m bench.validation --size-mb 200 --rounds 5

It builds two zips in memory of about ``--size-mb`` of images (512x512 16-bit DICOM-sized
entries): STORED, as the fake NBIA writes them, and DEFLATED with data descriptors, as the JDK's
ZipOutputStream does. Then, interleaved so machine noise hits all alike, it feeds each to
:class:`~proxy.binary.zipcheck.ZipCheck` in ``--chunk-kb`` pieces, with MD5s (every image
hashed: md5hashes.csv comes last) and CRC-only (``md5s="ignore"``), next to the bare costs in
the same run: the check's CRC-32 alone (ISA-L's when isal is installed; zlib's beside it),
hashlib.md5 alone, CRC-32 + MD5, and inflating alone (the check's inflater and zlib's). It prints
MB/s of zip bytes fed (median of the rounds) and each check's ratio to its bare cost; also two
checks at once in two threads (all zip bytes of both, per second), against one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import statistics
import threading
import time
import zipfile
import zlib
from collections.abc import Callable

from proxy.binary import zipcheck
from proxy.binary.zipcheck import Md5Policy, ZipCheck

IMAGE_BYTES = 512 * 512 * 2 + 1400
_HIGH_NIBBLE = bytes(i & 0x0F for i in range(256))  # 12-bit samples: high byte < 16


class _Pipe(io.RawIOBase):
    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def _image(n: int, rng: random.Random) -> bytes:
    """DICOM-like: a preamble, then 12-bit pixels with some noise (deflate gets ~2-3x)."""
    pixels = bytearray(IMAGE_BYTES - 132)
    pixels[0::2] = bytes((i * 7 + n) & 0xFF for i in range(len(pixels) // 2))
    pixels[1::2] = rng.randbytes(len(pixels[1::2])).translate(_HIGH_NIBBLE)
    return bytes(128) + b"DICM" + bytes(pixels)


def build(size_mb: int, method: int) -> tuple[bytes, int, int]:
    """A series zip (LICENSE, images, md5hashes.csv); returns it, image count and bytes."""
    rng = random.Random(1)
    count = max(1, size_mb * 1024 * 1024 // IMAGE_BYTES)
    base = [_image(n, rng) for n in range(8)]  # a few distinct images, reused
    sink = _Pipe() if method == zipfile.ZIP_DEFLATED else io.BytesIO()
    rows = []
    with zipfile.ZipFile(sink, "w", method, compresslevel=1) as zf:
        zf.writestr("LICENSE", b"Creative Commons Attribution 4.0 International\n")
        for n in range(1, count + 1):
            data = base[n % len(base)]
            zf.writestr(f"{n:08d}.dcm", data)
            rows.append(f"{n:08d}.dcm,{hashlib.md5(data).hexdigest()}\n")
        zf.writestr("md5hashes.csv", "Filename,MD5Hash\n" + "".join(rows))
    data = bytes(sink.data) if isinstance(sink, _Pipe) else sink.getvalue()
    return data, count, count * IMAGE_BYTES


def _pieces(data: bytes, chunk: int) -> list[memoryview]:
    view = memoryview(data)
    return [view[i : i + chunk] for i in range(0, len(data), chunk)]


def check_zip(pieces: list[memoryview], count: int, total: int, md5s: Md5Policy) -> None:
    check = ZipCheck(md5s=md5s, object_count=count, total_bytes=total)
    for piece in pieces:
        check.feed(piece)  # type: ignore[arg-type]
    verdict = check.finish()
    assert verdict.ok, verdict.message


def bare(
    pieces: list[memoryview], crc: bool, md5: bool, crc32: zipcheck.Crc32 = zipcheck.crc32
) -> None:
    value, digest = 0, hashlib.md5()
    for piece in pieces:
        if crc:
            value = crc32(piece, value)
        if md5:
            digest.update(piece)


def two_threads(run: Callable[[], None]) -> None:
    """``run`` twice at once in two threads: zlib and hashlib release the GIL on big buffers,
    so a check driven from a worker thread leaves the event loop's thread free."""
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _zlib_inflater() -> zipcheck.Inflater:
    return zlib.decompressobj(-15)


def inflate_only(
    data: bytes, new_inflater: Callable[[], zipcheck.Inflater] = zipcheck.new_inflater
) -> None:
    """Inflating every entry, nothing else (the floor for a DEFLATED zip)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
            inflater = new_inflater()
            inflater.decompress(memoryview(data)[start : start + info.compress_size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-kb", type=int, default=256)
    args = parser.parse_args()
    chunk = args.chunk_kb * 1024
    stored, count, total = build(args.size_mb, zipfile.ZIP_STORED)
    deflated, _, _ = build(args.size_mb, zipfile.ZIP_DEFLATED)
    ps, pd = _pieces(stored, chunk), _pieces(deflated, chunk)
    print(
        f"{count} images, {total / 1e6:.0f} MB; stored zip {len(stored) / 1e6:.0f} MB, "
        f"deflated zip {len(deflated) / 1e6:.0f} MB; chunks of {args.chunk_kb} KiB"
    )
    cases: dict[str, tuple[int, Callable[[], None]]] = {
        "bare crc32": (len(stored), lambda: bare(ps, True, False)),
        "zlib crc32": (len(stored), lambda: bare(ps, True, False, zlib.crc32)),
        "bare md5": (len(stored), lambda: bare(ps, False, True)),
        "bare crc32+md5": (len(stored), lambda: bare(ps, True, True)),
        "stored, check with MD5s": (len(stored), lambda: check_zip(ps, count, total, "required")),
        "stored, check CRC only": (len(stored), lambda: check_zip(ps, count, total, "ignore")),
        "stored, with MD5s, 2 threads": (
            2 * len(stored),
            lambda: two_threads(lambda: check_zip(ps, count, total, "required")),
        ),
        "bare inflate": (len(deflated), lambda: inflate_only(deflated)),
        "zlib inflate": (len(deflated), lambda: inflate_only(deflated, _zlib_inflater)),
        "deflated, check with MD5s": (
            len(deflated),
            lambda: check_zip(pd, count, total, "required"),
        ),
        "deflated, check CRC only": (len(deflated), lambda: check_zip(pd, count, total, "ignore")),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (size, run) in cases.items():
            start = time.perf_counter()
            run()
            rates[name].append(size / 1e6 / (time.perf_counter() - start))
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in median.items():
        print(
            f"{name:28s} {value:8.0f} MB/s   (rounds: {', '.join(f'{v:.0f}' for v in rates[name])})"
        )
    print(f"CRC-32 and inflate of the check: {zipcheck.crc32.__module__}")
    print("ratios in this run (check / its bare cost):")
    for check, cost in (
        ("stored, check with MD5s", "bare crc32+md5"),
        ("stored, check CRC only", "bare crc32"),
        ("deflated, check CRC only", "bare inflate"),
        ("stored, with MD5s, 2 threads", "stored, check with MD5s"),
        ("bare crc32", "zlib crc32"),
        ("bare inflate", "zlib inflate"),
    ):
        print(f"  {check} / {cost}: {median[check] / median[cost]:.2f}")


if __name__ == "__main__":
    main()

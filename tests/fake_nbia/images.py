"""The image store: DICOM bytes of every instance and the zips built from them.

Small series live in memory. The big series is generated into temporary zip
files (one per layout, built once per size and kept), so that streaming it costs
the fake nothing but file reads.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .dataset import Dataset, Series
from .dicom import (
    BIG_SIDE,
    ImageContext,
    SeriesZipWriter,
    ZipLayout,
    altered,
    build_instance,
    license_text,
    sop_instance_uid,
    zip_name,
)
from .faults import ZipFault

DEFAULT_BIG_ZIP_BYTES = 4 * 1024 * 1024
#: About the bytes of one big image's DICOM file.
BIG_FILE_BYTES = BIG_SIDE * BIG_SIDE * 2 + 1400
# eagerly built layouts of the big zip: plain getImage and tcia-utils' NewFileNames=Yes
EAGER_LAYOUTS = (ZipLayout(), ZipLayout(new_names=True))


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    number: int
    size: int
    md5: str


@dataclass
class _BigBuild:
    """The big series at one size: instance list plus a zip file per layout."""

    count: int
    directory: Path
    instances: list[Instance] = field(default_factory=list)
    zips: dict[ZipLayout, Path] = field(default_factory=dict)


class ImageStore:
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._small: dict[str, list[bytes]] = {}
        self._instances: dict[str, list[Instance]] = {}
        self._zips: dict[tuple[str, ZipLayout], bytes] = {}
        self._lock = threading.Lock()  # small zips
        self._big_lock = threading.RLock()  # big builds take seconds: keep them apart
        self._big_builds: dict[int, _BigBuild] = {}
        self._big_bytes = 0
        self._big_count = 0
        for series in dataset.series:
            if series.bulk:
                # Sizes and MD5s now (getSeries lists every size); the bytes only when sent.
                ctx = self.context(series)
                self._instances[series.uid] = [
                    Instance(sop_instance_uid(series.uid, n), n, len(b), hashlib.md5(b).hexdigest())
                    for n, b in (
                        (n, build_instance(ctx, n)) for n in range(1, series.instances + 1)
                    )
                ]
            elif not series.big:
                files = [
                    build_instance(self.context(series), n) for n in range(1, series.instances + 1)
                ]
                self._small[series.uid] = files
                self._instances[series.uid] = [
                    Instance(sop_instance_uid(series.uid, n), n, len(b), hashlib.md5(b).hexdigest())
                    for n, b in enumerate(files, start=1)
                ]

    def context(self, series: Series) -> ImageContext:
        ds = self.dataset
        collection = ds.collection(series.collection)
        assert collection is not None
        return ImageContext(
            collection,
            ds.patient(series.collection, series.patient_id),
            ds.study(series.study_uid),
            series,
        )

    # --- the big series -------------------------------------------------

    @property
    def big_zip_bytes(self) -> int:
        return self._big_bytes

    def set_big_zip_bytes(self, n: int) -> None:
        """Build (or reuse) the big series so that its zip is about `n` bytes."""
        count = max(1, round(n / BIG_FILE_BYTES))
        with self._big_lock:
            build = self._big_builds.get(count)
            if build is None:
                directory = Path(tempfile.mkdtemp(prefix="fake-nbia-big-"))
                # removed when the store is collected or the interpreter exits
                weakref.finalize(self, shutil.rmtree, directory, True)
                build = _BigBuild(count, directory)
                self._build_big(build, EAGER_LAYOUTS)
                self._big_builds[count] = build
            self._big_bytes = n
            self._big_count = count

    def _current_big(self) -> _BigBuild:
        with self._big_lock:
            if not self._big_bytes:
                self.set_big_zip_bytes(DEFAULT_BIG_ZIP_BYTES)
            return self._big_builds[self._big_count]

    def _big_series(self) -> Series:
        return next(s for s in self.dataset.series if s.big)

    def _build_big(self, build: _BigBuild, layouts: tuple[ZipLayout, ...]) -> None:
        """Write all `layouts` in one pass, generating each DICOM file once."""
        series = self._big_series()
        ctx = self.context(series)
        lic = license_text(ctx.collection)
        paths = {
            lay: build.directory / f"l{lay.license:d}n{lay.new_names:d}m{lay.md5:d}.zip"
            for lay in layouts
        }
        handles = {lay: open(path, "wb") for lay, path in paths.items()}
        try:
            zips = {
                lay: SeriesZipWriter(handles[lay], lic if lay.license else None, lay.md5)
                for lay in layouts
            }
            instances = []
            for n in range(1, build.count + 1):
                data = build_instance(ctx, n)
                instances.append(
                    Instance(
                        sop_instance_uid(series.uid, n), n, len(data), hashlib.md5(data).hexdigest()
                    )
                )
                for lay, zf in zips.items():
                    zf.add(zip_name(series, n, lay), data)
            for zf in zips.values():
                zf.close()
        finally:
            for fh in handles.values():
                fh.close()
        build.instances = instances
        build.zips.update(paths)

    def cleanup(self) -> None:
        """Delete the big zips now (they would go at interpreter exit anyway)."""
        with self._big_lock:
            for build in self._big_builds.values():
                shutil.rmtree(build.directory, ignore_errors=True)
            self._big_builds.clear()
            self._big_bytes = 0

    # --- lookups ----------------------------------------------------------

    def instances(self, series_uid: str) -> list[Instance]:
        series = self.dataset.find_series(series_uid)
        if series is None:
            return []
        if series.big:
            return self._current_big().instances
        return self._instances[series_uid]

    def instance_bytes(self, series_uid: str, sop_uid: str) -> bytes | None:
        series = self.dataset.find_series(series_uid)
        if series is None:
            return None
        for inst in self.instances(series_uid):
            if inst.sop_uid == sop_uid:
                if series.big or series.bulk:
                    return build_instance(self.context(series), inst.number)
                return self._small[series_uid][inst.number - 1]
        return None

    def first_instance_bytes(self, series_uid: str) -> bytes | None:
        insts = self.instances(series_uid)
        return self.instance_bytes(series_uid, insts[0].sop_uid) if insts else None

    def series_size(self, series_uid: str) -> tuple[int, int]:
        """(total bytes, object count) of a series' DICOM files."""
        insts = self.instances(series_uid)
        return sum(i.size for i in insts), len(insts)

    def zip_for(self, series_uid: str, layout: ZipLayout) -> bytes | Path | StreamedZip:
        """The download zip of a series: bytes for small series, a file for the big one, made
        while it is sent for the bulk collection's."""
        series = self.dataset.find_series(series_uid)
        assert series is not None
        if series.bulk:
            return StreamedZip(self, series, layout)
        if series.big:
            with self._big_lock:
                build = self._current_big()
                if layout not in build.zips:
                    self._build_big(build, (layout,))  # lazily, once per layout
                return build.zips[layout]
        key = (series_uid, layout)
        with self._lock:
            if key not in self._zips:
                buf = io.BytesIO()
                self._write_zip(series, layout, buf, None)
                self._zips[key] = buf.getvalue()
            return self._zips[key]

    def faulted_zip(self, series_uid: str, layout: ZipLayout, fault: ZipFault) -> bytes | Path:
        """The download zip as NBIA sends it when ``fault`` strikes (the big one built once)."""
        series = self.dataset.find_series(series_uid)
        assert series is not None
        if not series.big:
            buf = io.BytesIO()
            self._write_zip(series, layout, buf, fault)
            return buf.getvalue()
        with self._big_lock:
            build = self._current_big()
            name = f"fault-{fault.kind}-{fault.images}-l{layout.license:d}n{layout.new_names:d}"
            path = build.directory / f"{name}m{layout.md5:d}.zip"
            if not path.exists():  # the same bytes every time: a download may be reading it
                part = path.with_suffix(".part")
                with open(part, "wb") as fh:
                    self._write_zip(series, layout, fh, fault)
                part.rename(path)
            return path

    def _write_zip(
        self, series: Series, layout: ZipLayout, out: IO[bytes], fault: ZipFault | None
    ) -> None:
        ctx = self.context(series)
        writer = SeriesZipWriter(
            out, license_text(ctx.collection) if layout.license else None, layout.md5
        )
        for inst in self.instances(series.uid):
            if fault is not None and fault.kind == "closed_after" and inst.number > fault.images:
                # V4_getImage / getImageWithMD5Hash: the loop throws, finally closes the zip,
                # and the CSV (written after the loop) never comes
                writer.close(md5_list=False)
                return
            if series.big or series.bulk:
                data = build_instance(ctx, inst.number)
            else:
                data = self._small[series.uid][inst.number - 1]
            name = zip_name(series, inst.number, layout)
            if fault is not None and fault.kind == "altered_image" and inst.number == fault.images:
                writer.add(name, altered(data), listed_md5=inst.md5)
            else:
                writer.add(name, data)
        writer.close()


def bulk_instances_for(series_bytes: int) -> int:
    """Images per bulk series for a zip of about ``series_bytes``."""
    return max(1, round(series_bytes / BIG_FILE_BYTES)) if series_bytes else 0


class _Window:
    """A write-only file for :class:`zipfile.ZipFile` that hands its bytes on between entries.

    ZipFile seeks back only into the entry it is writing (to fill in the CRC and sizes), so
    keeping the bytes since the last hand-over is enough to look seekable: the zip is the same
    as one written to a real file, and memory holds one image at a time.
    """

    def __init__(self) -> None:
        self.base = 0  # offset of buf[0]
        self.pos = 0
        self.buf = bytearray()

    def write(self, data: bytes) -> int:
        at = self.pos - self.base
        self.buf[at : at + len(data)] = data
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else (self.pos + offset if whence == 1 else self.end)
        if target < self.base:
            raise OSError("seek before the bytes already sent")
        self.pos = target
        return target

    @property
    def end(self) -> int:
        return self.base + len(self.buf)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        """The bytes written since the last call (the zip's next piece)."""
        data = bytes(self.buf)
        self.base += len(data)
        self.buf.clear()
        return data


class StreamedZip:
    """A bulk series' zip, generated image by image while it is sent (never whole in memory)."""

    def __init__(self, store: ImageStore, series: Series, layout: ZipLayout) -> None:
        self.store, self.series, self.layout = store, series, layout

    def pieces(self, size: int) -> Iterator[bytes]:
        ctx = self.store.context(self.series)
        window = _Window()
        writer = SeriesZipWriter(
            window,  # type: ignore[arg-type]
            license_text(ctx.collection) if self.layout.license else None,
            self.layout.md5,
        )
        for inst in self.store.instances(self.series.uid):
            writer.add(
                zip_name(self.series, inst.number, self.layout), build_instance(ctx, inst.number)
            )
            data = window.take()
            for i in range(0, len(data), size):
                yield data[i : i + size]
        writer.close()
        yield window.take()

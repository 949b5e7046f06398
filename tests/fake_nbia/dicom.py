"""Building real DICOM files, series zips, tag dumps and thumbnails."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import zipfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

from pydicom import dcmread, dcmwrite
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from .dataset import Collection, Patient, Series, Study, make_uid

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
    "RTSTRUCT": "1.2.840.10008.5.1.4.1.1.481.3",
}
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed so repeated downloads are byte-identical
BIG_SIDE = 512  # big-series images are 512x512 uint16, ~513 KiB per file


@dataclass(frozen=True)
class ImageContext:
    """The records a DICOM instance draws its attributes from."""

    collection: Collection
    patient: Patient
    study: Study
    series: Series


@dataclass(frozen=True)
class ZipLayout:
    """Which entries a download zip holds (the endpoint decides)."""

    license: bool = True
    new_names: bool = False
    md5: bool = False


def sop_instance_uid(series_uid: str, number: int) -> str:
    return make_uid(f"{series_uid}/sop/{number}")


def dicom_date(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _pixels(side: int, seed: int) -> bytes:
    """A deterministic 12-bit gradient so images are not constant."""
    values = array(
        "H", ((x * 31 + y * 17 + seed * 101) % 4096 for y in range(side) for x in range(side))
    )
    return values.tobytes()


_BIG_PATTERN: bytes | None = None


def _big_pixels(number: int) -> bytes:
    """Big images share one pattern, rotated per instance (fast to build)."""
    global _BIG_PATTERN
    if _BIG_PATTERN is None:
        _BIG_PATTERN = _pixels(BIG_SIDE, 0)
    shift = (number * 2 * 97) % len(_BIG_PATTERN)
    return _BIG_PATTERN[shift:] + _BIG_PATTERN[:shift]


def build_instance(ctx: ImageContext, number: int) -> bytes:
    """One Part-10 DICOM file (explicit VR little endian) for instance `number` (1-based)."""
    series, study, patient = ctx.series, ctx.study, ctx.patient
    sop_class = SOP_CLASSES.get(series.modality, SOP_CLASSES["CT"])
    sop_uid = sop_instance_uid(series.uid, number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(make_uid("fake-nbia/implementation"))
    meta.ImplementationVersionName = "FAKE_NBIA_1"

    ds = DicomDataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = dicom_date(study.date)
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = series.modality
    ds.Manufacturer = series.manufacturer
    ds.ManufacturerModelName = series.model
    ds.SoftwareVersions = series.software
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = patient.patient_id
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    ds.PatientAge = study.patient_age
    ds.BodyPartExamined = series.body_part
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id[:16]
    ds.SeriesNumber = series.number
    ds.InstanceNumber = number
    ds.FrameOfReferenceUID = make_uid(f"{study.uid}/for")
    if series.modality == "RTSTRUCT":
        _add_rt_references(ds, ctx)
        return _encode(ds)
    if series.modality == "SEG":
        _add_seg_references(ds, ctx)
    side = BIG_SIDE if series.big or series.bulk else (16 if series.modality == "SEG" else 32)
    ds.ImagePositionPatient = [0, 0, -2.5 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.SliceThickness = 2.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if series.modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = _big_pixels(number) if side == BIG_SIDE else _pixels(side, number)
    return _encode(ds)


def _encode(ds: DicomDataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _ref_item(sop_class: str, sop_uid: str) -> DicomDataset:
    item = DicomDataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _add_seg_references(ds: DicomDataset, ctx: ImageContext) -> None:
    """SEG points at its source series the way tcia-utils getSegRefSeries expects."""
    ref = ctx.series.references or ""
    series_item = DicomDataset()
    series_item.ReferencedInstanceSequence = Sequence(
        [_ref_item(SOP_CLASSES["CT"], sop_instance_uid(ref, 1))]
    )
    series_item.SeriesInstanceUID = ref
    ds.ReferencedSeriesSequence = Sequence([series_item])
    ds.SegmentationType = "BINARY"
    ds.ContentLabel = "TUMOR"


def _add_rt_references(ds: DicomDataset, ctx: ImageContext) -> None:
    """RTSTRUCT: frame of reference > study > series > contour images."""
    ref = ctx.series.references or ""
    rt_series = DicomDataset()
    rt_series.SeriesInstanceUID = ref
    rt_series.ContourImageSequence = Sequence(
        [_ref_item(SOP_CLASSES["CT"], sop_instance_uid(ref, 1))]
    )
    rt_study = _ref_item("1.2.840.10008.3.1.2.3.1", ctx.study.uid)
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    frame = DicomDataset()
    frame.FrameOfReferenceUID = ds.FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])
    ds.StructureSetLabel = "ROI"
    roi = DicomDataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
    roi.ROIName = "GTV"
    ds.StructureSetROISequence = Sequence([roi])


# --- zips -----------------------------------------------------------------


def new_file_name(series: Series, number: int) -> str:
    """The 'NewFileNames=yes' style name: <SeriesNumber>-<InstanceNumber>.dcm."""
    return f"{series.number}-{number:02d}.dcm"


def license_text(collection: Collection) -> bytes:
    name, uri = collection.license
    return (
        f"{collection.name} is distributed under the {name}.\n"
        f"See {uri}\nData citation: {collection.doi}\n"
    ).encode()


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 0
    info.external_attr = 0
    return info


class SeriesZipWriter:
    """A series zip written file by file: [LICENSE] + files [+ md5hashes.csv].

    STORED with fixed timestamps, so the same input always gives the same bytes.
    """

    def __init__(self, out: IO[bytes], license_bytes: bytes | None, md5: bool) -> None:
        self._zf = zipfile.ZipFile(out, "w", zipfile.ZIP_STORED)
        self._md5 = md5
        self._hashes: list[tuple[str, str]] = []
        if license_bytes is not None:
            self._zf.writestr(_entry("LICENSE"), license_bytes)

    def add(self, name: str, data: bytes, listed_md5: str | None = None) -> None:
        """One file; md5hashes.csv lists ``listed_md5`` for it if given (the database's value)."""
        self._zf.writestr(_entry(name), data)
        if self._md5:
            self._hashes.append((name, listed_md5 or hashlib.md5(data).hexdigest()))

    def close(self, md5_list: bool = True) -> None:
        """End the zip; ``md5_list=False`` leaves md5hashes.csv out, as a failed loop does."""
        if self._md5 and md5_list:
            rows = "".join(f"{n},{h}\n" for n, h in sorted(self._hashes))
            self._zf.writestr(_entry("md5hashes.csv"), ("Filename,MD5Hash\n" + rows).encode())
        self._zf.close()


def altered(data: bytes) -> bytes:
    """The same file with its last byte (pixel data) changed: same size, other MD5."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def zip_name(series: Series, number: int, layout: ZipLayout) -> str:
    """Entry name of instance `number`: 00000001.dcm, or the new-file-name style."""
    return new_file_name(series, number) if layout.new_names else f"{number:08d}.dcm"


# --- tag dump -------------------------------------------------------------


def _tag_text(elem: DataElement) -> str:
    return f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _value_text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return "\\".join(f"{b:02x}" for b in value[:64])
    if elem.VM > 1 and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def _dump(ds: Iterable[DataElement], depth: int) -> Iterator[dict[str, str]]:
    prefix = ">" * depth
    for elem in ds:
        if elem.tag == 0x7FE00010:  # pixel data is not dumped
            continue
        row = {"element": prefix + _tag_text(elem), "name": elem.name}
        if elem.VR == "SQ":
            # sequences get a start row and an "End" row: tcia-utils' getSegRefSeries
            # relies on both (see nbia-api.md, getDicomTags)
            yield {**row, "data": ""}
            for item in elem.value:
                yield from _dump(item, depth + 1)
            yield {**row, "name": f"End {elem.name}", "data": ""}
        else:
            yield {**row, "data": _value_text(elem)}


def dicom_tags(data: bytes) -> list[dict[str, str]]:
    """element/name/data triples of a DICOM file, file meta first."""
    ds = dcmread(io.BytesIO(data))
    return [*_dump(ds.file_meta, 0), *_dump(ds, 0)]


# --- thumbnail ------------------------------------------------------------


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def make_jpeg(shade: int, side: int = 16) -> bytes:
    """A valid baseline JPEG: a uniform grey square (no imaging library needed).

    Every 8x8 block is DC-only. The first block codes its DC value, the others a
    zero difference; quantisation is 1, so the pixel value is 128 + DC/8.
    """
    dc = 8 * (1 + shade % 127)  # grey level 129..255
    cat = dc.bit_length()
    blocks = (side // 8) ** 2
    bits = "0" + format(dc, f"0{cat}b") + "0"  # DC cat code, value, EOB
    bits += "100" * (blocks - 1)  # DC diff 0 (code 10), EOB (code 0)
    bits += "1" * (-len(bits) % 8)
    scan = bytearray()
    for i in range(0, len(bits), 8):
        byte = int(bits[i : i + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0)  # byte stuffing
    counts_dc = bytes([1, 1] + [0] * 14)
    counts_ac = bytes([1] + [0] * 15)
    return b"".join(
        [
            b"\xff\xd8",
            _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            _segment(0xDB, b"\x00" + b"\x01" * 64),
            _segment(0xC0, b"\x08" + side.to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"),
            _segment(0xC4, b"\x00" + counts_dc + bytes([cat, 0])),
            _segment(0xC4, b"\x10" + counts_ac + b"\x00"),
            _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
            bytes(scan),
            b"\xff\xd9",
        ]
    )

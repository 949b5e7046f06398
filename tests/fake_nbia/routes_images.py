"""Binary endpoints (zips, single images, WADO, hashes, thumbnails) for v1, v2, v4 and root."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from .dataset import Series
from .dicom import ZipLayout, altered, make_jpeg
from .images import Instance
from .responses import ApiError, Reply, bad_request, no_access, server_error, text
from .routing import Call, route


def _series(call: Call, uid: str) -> Series:
    series = call.fake.dataset.find_series(uid)
    if series is None:
        raise no_access(uid, public_api=call.generation == "v1")
    return series


def _yes(value: str | None) -> bool:
    return (value or "").lower() == "yes"


def zip_reply(call: Call, layout: ZipLayout) -> Reply:
    """A streamed series zip: octet-stream, attachment, no Content-Length."""
    uid = call.require("SeriesInstanceUID")
    _series(call, uid)
    fault = call.fake.faults.take_zip_fault(call.log.path)
    images = call.fake.images
    body = images.zip_for(uid, layout) if fault is None else images.faulted_zip(uid, layout, fault)
    return Reply(
        200,
        body,
        "application/octet-stream",
        [("content-disposition", f'attachment; filename="{uid}.zip"')],
        stream=True,
        zip=True,
    )


@route("v4", "getImage", allowed=("SeriesInstanceUID", "NewFileNames", "IncludeMD5"))
def get_image_v4(call: Call) -> Reply:
    return zip_reply(
        call, ZipLayout(new_names=_yes(call.get("NewFileNames")), md5=_yes(call.get("IncludeMD5")))
    )


@route("v1", "getImage")
@route("v2", "getImage")
def get_image_legacy(call: Call) -> Reply:
    return zip_reply(call, ZipLayout(new_names=_yes(call.get("NewFileNames"))))


@route("v4", "getImageWithMD5Hash", allowed=("SeriesInstanceUID",))
@route("v2", "getImageWithMD5Hash")
@route("v1", "getImageWithMD5Hash")
def get_image_with_md5(call: Call) -> Reply:
    return zip_reply(call, ZipLayout(license=False, md5=True))


@route("v4", "getDCMImage", allowed=("SeriesInstanceUID", "IncludeAnnotation", "MD5Verification"))
@route("v2", "getDCMImage")
@route("v1", "getDCMImage")
def get_dcm_image(call: Call) -> Reply:
    """Original file names, md5hashes.csv when MD5Verification=yes (the fake has no
    annotation files, so IncludeAnnotation changes nothing)."""
    md5 = _yes(call.get("MD5Verification"))
    return zip_reply(call, ZipLayout(license=False, new_names=True, md5=md5))


@route("v4", "getImageOther", allowed=("SeriesInstanceUID",))
@route("v1", "getImageOther")
def get_image_other(call: Call) -> Reply:
    """The files as the alternate data source names them: original names, nothing else."""
    return zip_reply(call, ZipLayout(license=False, new_names=True))


@route("v4", "getSingleImage", allowed=("SeriesInstanceUID", "SOPInstanceUID"))
@route("v2", "getSingleImage")
@route("v1", "getSingleImage")
def get_single_image(call: Call) -> Reply:
    uid = call.require("SeriesInstanceUID")
    sop = call.require("SOPInstanceUID")
    _series(call, uid)
    data = call.fake.images.instance_bytes(uid, sop)
    if data is None:
        raise no_access(uid, public_api=call.generation == "v1")
    return Reply(
        200, data, "application/dicom", [("content-disposition", f"attachment; filename={sop}.dcm")]
    )


def _md5_of_sop(call: Call, sop: str) -> str:
    for series in call.fake.dataset.series:
        for inst in call.fake.images.instances(series.uid):
            if inst.sop_uid == sop:
                return inst.md5
    raise server_error(None)


@route("v4", "getMD5HashForImage", allowed=("SOPInstanceUID",))
def get_md5_for_image_v4(call: Call) -> Reply:
    return text(_md5_of_sop(call, call.require("SOPInstanceUID")))


@route("v2", "getM5HashForImage")
@route("v1", "getM5HashForImage")
def get_md5_for_image_legacy(call: Call) -> Reply:
    return text(_md5_of_sop(call, call.require("SOPInstanceUid")))


def md5_hierarchy(call: Call) -> Reply:
    """MD5 over the sorted MD5s below the given level (series < study < patient < collection)."""
    data = call.fake.dataset
    levels: dict[str, Callable[[Series, str], bool]] = {
        "SeriesInstanceUID": lambda s, v: s.uid == v,
        "StudyInstanceUID": lambda s, v: s.study_uid == v,
        "PatientID": lambda s, v: s.patient_id == v,
        "Collection": lambda s, v: s.collection.lower() == v.lower(),
    }
    for param, test in levels.items():
        value = call.get(param)
        if value:
            series = [s for s in data.series if test(s, value)]
            break
    else:
        raise bad_request(
            "A parameter, SeriesInstanceUID, StudyInstanceUID, PatientID or "
            "Collection, is required for this API call."
        )
    if not series:
        return Reply(200)
    per_series = []
    for s in series:
        inner = "".join(sorted(i.md5 for i in call.fake.images.instances(s.uid)))
        per_series.append(hashlib.md5(inner.encode()).hexdigest())
    digest = hashlib.md5("".join(sorted(per_series)).encode()).hexdigest()
    return text(digest)  # no trailing newline


route(
    "v4",
    "getMD5Hierarchy",
    "POST",
    allowed=("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection"),
)(md5_hierarchy)
route("root", "getMD5Hierarchy", "POST")(md5_hierarchy)


def _wado_failed(reason: str) -> ApiError:
    return ApiError(text(f"WADO request failed: {reason}", 400))


def _wado_image(call: Call, series_param: str, object_param: str) -> tuple[Series, Instance]:
    """The series and instance a WADO-style request names; any miss is WADO's 400."""
    series_uid, sop = call.get(series_param) or "", call.get(object_param)
    series = call.fake.dataset.find_series(series_uid)
    insts = call.fake.images.instances(series_uid) if series else []
    inst = next((i for i in insts if i.sop_uid == sop), None)
    if series is None or inst is None:
        raise _wado_failed("image not found")
    return series, inst


def _shade(series: Series, inst: Instance) -> int:
    return series.pk // 65_536 + inst.number


def thumbnail(call: Call) -> Reply:
    series, inst = _wado_image(call, "seriesUID", "objectUID")
    return Reply(200, make_jpeg(_shade(series, inst)), "image/jpeg")


route("v4", "getThumbnail", "POST", allowed=("seriesUID", "objectUID"))(thumbnail)
route("root", "getThumbnail", "POST")(thumbnail)

#: WADO-URI's default answer for a single-frame image (DICOM PS3.18); application/dicom asks
#: for the file itself.
WADO_DEFAULT_TYPE = "image/jpeg"
WADO_TYPES = ("image/jpeg", "application/dicom")
WADO_MAX_SIDE = 256


def _wado_side(call: Call) -> int:
    """The JPEG's side: ``rows``/``columns`` (the larger, up to a multiple of 8), else 16."""
    asked = [call.get(name) for name in ("rows", "columns")]
    sides = []
    for value in filter(None, asked):
        if not value.isdigit() or not 0 < int(value) <= WADO_MAX_SIDE:
            raise _wado_failed(f"rows and columns must be 1 to {WADO_MAX_SIDE}, not {value!r}")
        sides.append(int(value))
    return -(-max(sides, default=16) // 8) * 8


def wado(call: Call) -> Reply:
    """WADO-URI (v1 wado GET query, getWado POST form): one image as a JPEG (the default) or
    the DICOM file; every error is WADO's 400 text/plain. ``alter_image(n)`` changes image
    ``n``'s bytes as it does in zips."""
    if call.get("requestType") != "WADO":
        raise _wado_failed("requestType must be WADO")
    series, inst = _wado_image(call, "seriesUID", "objectUID")
    if call.get("studyUID") != series.study_uid:
        raise _wado_failed("image not found")
    content_type = call.get("contentType") or WADO_DEFAULT_TYPE
    if content_type not in WADO_TYPES:
        raise _wado_failed(f"contentType {content_type!r} is not supported")
    if content_type == "application/dicom":
        data = call.fake.images.instance_bytes(series.uid, inst.sop_uid) or b""
    else:
        data = make_jpeg(_shade(series, inst), _wado_side(call))
    fault = call.fake.faults.take_image_fault(call.log.path)
    if fault is not None and fault.images == inst.number:
        data = altered(data)
    return Reply(200, data, content_type)


route("v1", "wado")(wado)
route("v1", "getWado", "POST")(wado)
route("root", "getWado", "POST")(wado)

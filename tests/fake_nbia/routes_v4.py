"""v4 metadata and search resources (/nbia-api/services/v4/...)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

from .dataset import Series
from .dicom import dicom_tags as dump
from .responses import (
    Reply,
    bad_request,
    dumps,
    empty,
    json_reply,
    no_access,
    rows_reply,
    server_error,
    text,
)
from .routing import Call, route
from .search import MANIFEST_TYPE, manifest, run_search, summary_json
from .tables import METADATA_V4, PATIENT_V4, SERIES_V4, STUDY_V4, parse_v4_date, same

FMT = ("format",)


def _fmt(call: Call) -> str | None:
    return call.get("format")


def distinct(values: list[str], column: str, call: Call) -> Reply:
    rows = [{column: v} for v in sorted(set(values))]
    return rows_reply(rows, (column,), _fmt(call), multi_column=False)


def _from_date(call: Call, default: str | None = None) -> dt.date:
    raw = call.get("fromDate") or default
    if raw is None:
        raise bad_request("A parameter, fromDate, is required for this API call.")
    try:
        return parse_v4_date(raw)
    except ValueError:
        raise server_error(f'Unparseable date: "{raw}"') from None


# --- value lists ------------------------------------------------------------


@route("v4", "getCollectionValues", allowed=FMT)
def collection_values(call: Call) -> Reply:
    return distinct([s.collection for s in call.fake.dataset.series], "Collection", call)


@route("v4", "getModalityValues", allowed=("Collection", "BodyPartExamined") + FMT)
def modality_values(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"), body_part=call.get("BodyPartExamined")
    )
    return distinct([s.modality for s in found], "Modality", call)


@route("v4", "getBodyPartValues", allowed=("Collection", "Modality") + FMT)
def body_part_values(call: Call) -> Reply:
    found = call.fake.tables.series_where(call.get("Collection"), modality=call.get("Modality"))
    return distinct([s.body_part for s in found], "BodyPartExamined", call)


@route("v4", "getManufacturerValues", allowed=("Collection", "Modality", "BodyPartExamined") + FMT)
def manufacturer_values(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"),
        modality=call.get("Modality"),
        body_part=call.get("BodyPartExamined"),
    )
    return distinct([s.manufacturer for s in found], "Manufacturer", call)


# --- patients and studies ---------------------------------------------------


def _patients_with_series(
    call: Call,
    collection: str | None,
    keep: Callable[[Series], bool] = lambda s: True,
) -> list[dict[str, object]]:
    data = call.fake.dataset
    ids = {
        (s.collection, s.patient_id)
        for s in data.series
        if same(s.collection, collection) and keep(s)
    }
    return [
        call.fake.tables.patient_v4(p) for p in data.patients if (p.collection, p.patient_id) in ids
    ]


@route("v4", "getPatient", allowed=("Collection", "PatientId") + FMT)
def patients(call: Call) -> Reply:
    rows = [
        r
        for r in _patients_with_series(call, call.get("Collection"))
        if same(str(r["PatientId"]), call.get("PatientId"))
    ]
    return rows_reply(rows, PATIENT_V4, _fmt(call))


@route("v4", "getPatientByCollectionAndModality", allowed=("Collection", "Modality") + FMT)
def patients_by_modality(call: Call) -> Reply:
    collection, modality = call.require("Collection"), call.require("Modality")
    rows = _patients_with_series(call, collection, lambda s: same(s.modality, modality))
    return rows_reply(rows, ("PatientId", "Authorized"), _fmt(call))


@route("v4", "NewPatientsInCollection", allowed=("Collection", "fromDate") + FMT)
def new_patients(call: Call) -> Reply:
    collection = call.require("Collection")
    since = _from_date(call)
    # ">=" here, unlike getUpdatedSeries (PatientDAOImpl.getPatientByCollection_v4).
    rows = _patients_with_series(call, collection, lambda s: s.released >= since)
    return rows_reply(rows, PATIENT_V4, _fmt(call))


def _studies(call: Call, keep: Callable[[Series], bool]) -> Reply:
    data = call.fake.dataset
    uids = {s.study_uid for s in data.series if keep(s)}
    rows = [call.fake.tables.study_v4(st) for st in data.studies if st.uid in uids]
    return rows_reply(rows, STUDY_V4, _fmt(call))


@route("v4", "getPatientStudy", allowed=("Collection", "PatientID", "StudyInstanceUID") + FMT)
def patient_studies(call: Call) -> Reply:
    c, p, st = call.get("Collection"), call.get("PatientID"), call.get("StudyInstanceUID")
    return _studies(
        call, lambda s: same(s.collection, c) and same(s.patient_id, p) and same(s.study_uid, st)
    )


@route("v4", "NewStudiesInPatientCollection", allowed=("Collection", "PatientID", "fromDate") + FMT)
def new_studies(call: Call) -> Reply:
    c = call.require("Collection")
    since = _from_date(call)
    p = call.get("PatientID")
    return _studies(
        call, lambda s: same(s.collection, c) and same(s.patient_id, p) and s.released >= since
    )


# --- series -----------------------------------------------------------------

SERIES_FILTERS = (
    "Collection",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
)


@route("v4", "getSeries", allowed=SERIES_FILTERS + FMT)
def series(call: Call) -> Reply:
    found = call.fake.tables.series_where(*(call.get(p) for p in SERIES_FILTERS))
    return rows_reply([call.fake.tables.series_v4(s) for s in found], SERIES_V4, _fmt(call))


@route("v4", "getUpdatedSeries", allowed=("fromDate",) + FMT)
def updated_series(call: Call) -> Reply:
    since = _from_date(call, "01-01-1900")
    found = [s for s in call.fake.dataset.series if s.released > since]
    return rows_reply([call.fake.tables.series_v4(s) for s in found], SERIES_V4, _fmt(call))


@route("v4", "getSeriesSize", allowed=("SeriesInstanceUID",) + FMT)
@route("v1", "getSeriesSize")
@route("v2", "getSeriesSize")
def series_size(call: Call) -> Reply:
    total, count = call.fake.images.series_size(call.require("SeriesInstanceUID"))
    # SUM() over no rows is NULL (omitted), COUNT() is 0
    row = {"TotalSizeInBytes": total if count else None, "ObjectCount": count}
    return rows_reply([row], ("TotalSizeInBytes", "ObjectCount"), _fmt(call))


@route("v4", "getSOPInstanceUIDs", allowed=("SeriesInstanceUID",) + FMT)
@route("v1", "getSOPInstanceUIDs")
@route("v2", "getSOPInstanceUIDs")
def sop_instance_uids(call: Call) -> Reply:
    insts = call.fake.images.instances(call.require("SeriesInstanceUID"))
    rows = [{"SOPInstanceUID": i.sop_uid} for i in insts]
    return rows_reply(rows, ("SOPInstanceUID",), _fmt(call), multi_column=False)


def series_list(call: Call) -> list[Series]:
    """The `list` form values: repeatable and comma-separated; junk characters stripped."""
    joined = ",".join(call.get_all("list"))
    uids = [u for u in re.sub(r"[^0-9,.]", "", joined).split(",") if u]
    return call.fake.tables.series_in(uids)


@route("v4", "getSeriesMetadata", "POST")
def series_metadata(call: Call) -> Reply:
    if not call.get_all("list"):
        raise bad_request(
            "A form parameter, list, containing at least one SeriesInstanceUID is required."
        )
    fmt = call.get("format")
    rows = [call.fake.tables.metadata_v4(s) for s in series_list(call)]
    return rows_reply(rows, METADATA_V4, "csv-download" if fmt in (None, "csv") else fmt)


# --- counts -----------------------------------------------------------------


def count_rows(series: list[Series], pick: Callable[[Series], str]) -> list[tuple[str, int]]:
    """(value, number of distinct patients) pairs, sorted by value."""
    patients: dict[str, set[tuple[str, str]]] = {}
    for s in series:
        patients.setdefault(pick(s), set()).add((s.collection, s.patient_id))
    return sorted((v, len(p)) for v, p in patients.items())


def _counts_reply(pairs: list[tuple[str, int]], column: str) -> Reply:
    if not pairs:
        return empty()
    return json_reply([{column: v, "Count": n, "Authorized": 1} for v, n in pairs])


@route("v4", "getCollectionValuesAndCounts")
def collection_counts(call: Call) -> Reply:
    return _counts_reply(count_rows(call.fake.dataset.series, lambda s: s.collection), "Collection")


@route("v4", "getModalityValuesAndCounts", allowed=("Collection", "BodyPartExamined"))
def modality_counts(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"), body_part=call.get("BodyPartExamined")
    )
    return _counts_reply(count_rows(found, lambda s: s.modality), "Modality")


@route("v4", "getBodyPartValuesAndCounts", allowed=("Collection", "Modality"))
def body_part_counts(call: Call) -> Reply:
    found = call.fake.tables.series_where(call.get("Collection"), modality=call.get("Modality"))
    return _counts_reply(count_rows(found, lambda s: s.body_part), "BodyPart")


@route(
    "v4", "getManufacturerValuesAndCounts", allowed=("Collection", "Modality", "BodyPartExamined")
)
def manufacturer_counts(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"),
        modality=call.get("Modality"),
        body_part=call.get("BodyPartExamined"),
    )
    return _counts_reply(count_rows(found, lambda s: s.manufacturer), "Manufacturer")


def species_pairs(call: Call) -> list[tuple[str, int]]:
    data = call.fake.dataset
    return count_rows(data.series, lambda s: data.patient(s.collection, s.patient_id).species[0])


@route("v4", "getSpeciesValuesAndCounts")
def species_counts(call: Call) -> Reply:
    return _counts_reply(species_pairs(call), "Species")


SPECIES_TAX = [
    {"speciesCode": "447612001", "speciesDescription": "Mus musculus"},
    {"speciesCode": "448771007", "speciesDescription": "Canis lupus familiaris"},
    {"speciesCode": "337915000", "speciesDescription": "Homo sapiens"},
]


@route("v4", "getSpeciesTax")
@route("root", "getSpeciesTax")
def species_tax(call: Call) -> Reply:
    return json_reply(SPECIES_TAX)


# --- collections, DOIs, tags ------------------------------------------------


def description_rows(call: Call, root: bool) -> list[dict[str, object]]:
    wanted = call.get("collectionName")
    rows: list[dict[str, object]] = []
    for c in call.fake.dataset.collections:
        if wanted and c.name.lower() != wanted.lower():
            continue
        row: dict[str, object] = {
            "description": c.description,
            "id": c.desc_id,
            "collectionName": c.name,
            "descriptionURI": c.doi,
        }
        if root:  # the root DTO also carries these (Jackson keeps nulls)
            row = {
                "description": c.description,
                "id": c.desc_id,
                "collectionDescTimestamp": None,
                "collectionName": c.name,
                "userName": None,
                "licenseId": None,
                "descriptionURI": c.doi,
            }
        rows.append(row)
    return rows


@route("v4", "getCollectionDescriptions", allowed=("collectionName",))
def collection_descriptions(call: Call) -> Reply:
    rows = description_rows(call, root=False)
    return json_reply(rows) if rows else empty()


def doi_rows(call: Call) -> Reply:
    doi = (call.get("DOI") or "").lower().removeprefix("https://doi.org/")
    want_series = (call.get("CollectionOrSeries") or "").lower() == "series"
    rows: list[dict[str, object]] = []
    for c in call.fake.dataset.collections:
        if not doi or c.doi.lower().removeprefix("https://doi.org/") != doi:
            continue
        if want_series:
            rows += [
                {
                    "collection": c.name,
                    "seriesInstanceUID": s.uid,
                    "thirdPartyAnanlysis": s.third_party,
                }  # sic, as the server spells it
                for s in call.fake.dataset.series
                if s.collection == c.name
            ]
        else:
            rows.append(
                {"collection": c.name, "seriesInstanceUID": None, "thirdPartyAnanlysis": None}
            )
    return Reply(200, dumps(rows), "application/json") if rows else empty()


route("v4", "getCollectionOrSeriesForDOI", "POST", allowed=("DOI", "CollectionOrSeries"))(doi_rows)
route("root", "getCollectionOrSeriesForDOI", "POST")(doi_rows)


def dicom_tags(call: Call) -> Reply:
    uid = call.require("SeriesUID")
    if call.fake.dataset.find_series(uid) is None:
        raise no_access(uid)
    first = call.fake.images.first_instance_bytes(uid)
    return json_reply(dump(first)) if first else empty()


route("v4", "getDicomTags", allowed=("SeriesUID",))(dicom_tags)
route("root", "getDicomTags")(dicom_tags)


# --- simple search and manifests -----------------------------------------------


@route("v4", "getSimpleSearch", "POST")
def simple_search(call: Call) -> Reply:
    return json_reply(summary_json(call.fake.dataset, run_search(call)))


def manifest_for_search(call: Call, legacy_dates: bool) -> Reply:
    result = run_search(call, legacy_dates)
    uids = [s.uid for _, series in result.patients for s in series]
    return Reply(200, manifest(call.fake.name, uids, False), MANIFEST_TYPE)


@route("v4", "getManifestForSimpleSearch", "POST")
def manifest_for_simple_search(call: Call) -> Reply:
    return manifest_for_search(call, legacy_dates=False)


def restrictions(call: Call, legacy_dates: bool) -> Reply:
    result = run_search(call, legacy_dates)
    data = call.fake.dataset
    restricted = any(
        data.collection(s.collection).commercial_restricted  # type: ignore[union-attr]
        for _, series in result.all_patients
        for s in series
    )
    return text("yes" if restricted else "no")


@route("v4", "getRestrictionsForSimpleSearch", "POST")
def restrictions_for_simple_search(call: Call) -> Reply:
    return restrictions(call, legacy_dates=False)


def manifest_text(call: Call) -> Reply:
    """Echoes the given UIDs without a lookup; includeAnnotation is read unchecked."""
    uids = call.get_all("list")
    if not uids:
        raise bad_request("A parameter, list, is required for this API call.")
    flag = call.get("includeAnnotation")
    if flag is None:
        raise server_error("null")
    return Reply(200, manifest(call.fake.name, uids, flag.lower() == "true"), MANIFEST_TYPE)


route("v4", "getManifestText", "POST", allowed=("list", "includeAnnotation"))(manifest_text)
route("root", "getManifestTextV2", "POST")(manifest_text)

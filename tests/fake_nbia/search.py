"""Simple search (numbered criteria triples), its summary JSON and manifests."""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .dataset import Dataset, Patient, Series
from .responses import server_error
from .routing import Call

MANIFEST_TYPE = "application/x-nbia-manifest-file"

SERIES_VALUE_CRITERIA: dict[str, Callable[[Series], str]] = {
    "CollectionCriteria": lambda s: s.collection,
    "ImageModalityCriteria": lambda s: s.modality,
    "AnatomicalSiteCriteria": lambda s: s.body_part,
    "BodyPartExaminedCriteria": lambda s: s.body_part,
    "ManufacturerCriteria": lambda s: s.manufacturer,
    "ModelCriteria": lambda s: s.model,
    "SoftwareVersionCriteria": lambda s: s.software,
    "PatientCriteria": lambda s: s.patient_id,
    "StudyCriteria": lambda s: s.study_uid,
    "SeriesCriteria": lambda s: s.uid,
}


@dataclass
class SearchResult:
    patients: list[tuple[Patient, list[Series]]]  # the requested page, each with its series
    all_patients: list[tuple[Patient, list[Series]]]
    sort: str


def _int(value: str | None) -> int:
    if value is None:
        raise server_error("null")  # unchecked: NullPointerException
    try:
        return int(value)
    except ValueError:
        raise server_error(f'For input string: "{value}"') from None


def _date(value: str | None, legacy: bool) -> dt.date:
    fmt = "%d/%m/%Y" if legacy else "%m-%d-%Y"
    try:
        return dt.datetime.strptime(value or "", fmt).date()
    except ValueError:
        raise server_error(f'Unparseable date: "{value}"') from None


def run_search(call: Call, legacy_dates: bool = False) -> SearchResult:
    """Filter like SearchUtil: OR within a criteria type, AND across types."""
    data: Dataset = call.fake.dataset
    values: dict[str, set[str]] = defaultdict(set)
    date_ranges: list[tuple[dt.date, dt.date]] = []
    i = 0
    while (ctype := call.get(f"criteriaType{i}")) is not None:
        if ctype == "DateRangeCriteria":
            date_ranges.append(
                (
                    _date(call.get(f"fromDate{i}"), legacy_dates),
                    _date(call.get(f"toDate{i}"), legacy_dates),
                )
            )
        elif ctype == "TimePointCriteria":
            if call.get(f"eventType{i}") is None or (
                call.get(f"fromDay{i}") is None and call.get(f"toDay{i}") is None
            ):
                raise server_error("null")
        else:
            values[ctype].add((call.get(f"value{i}") or "").lower())
        i += 1  # unknown types (e.g. tcia-utils' "Criteria.DateRange") are ignored
    sort_field, direction = call.get("sortField"), call.get("sortDirection")
    start, size = _int(call.get("start")), _int(call.get("size"))
    if sort_field is None or direction is None:
        raise server_error("null")

    def keep(s: Series) -> bool:
        study = data.study(s.study_uid)
        patient = data.patient(s.collection, s.patient_id)
        collection = data.collection(s.collection)
        for ctype, field in SERIES_VALUE_CRITERIA.items():
            if ctype in values and field(s).lower() not in values[ctype]:
                return False
        if "SpeciesCriteria" in values and patient.species[0] not in values["SpeciesCriteria"]:
            return False
        if (
            "ThirdPartyAnalysis" in values
            and s.third_party.lower() not in values["ThirdPartyAnalysis"]
        ):
            return False
        if (
            "yes" in values.get("ExcludeCommercialCriteria", ())
            and collection
            and collection.commercial_restricted
        ):
            return False
        return all(lo <= study.date <= hi for lo, hi in date_ranges)

    grouped: dict[tuple[str, str], list[Series]] = defaultdict(list)
    for s in data.series:
        if keep(s):
            grouped[(s.collection, s.patient_id)].append(s)
    wanted_modalities = values.get("ImageModalityCriteria", set())
    anded = "ModalityAndedSearchCriteria" in values
    min_studies = max(
        (int(v) for v in values.get("MinNumberOfStudiesCriteria", ()) if v.isdigit()), default=0
    )
    rows = []
    for (collection, pid), series in grouped.items():
        if anded and not wanted_modalities <= {s.modality.lower() for s in series}:
            continue
        if len({s.study_uid for s in series}) < min_studies:
            continue
        rows.append((data.patient(collection, pid), series))

    keys: dict[str, Callable[[tuple[Patient, list[Series]]], Any]] = {
        "studies": lambda r: len({s.study_uid for s in r[1]}),
        "series": lambda r: len(r[1]),
        "collection": lambda r: r[0].collection,
    }
    rows.sort(key=lambda r: r[0].patient_id)
    rows.sort(
        key=keys.get(sort_field, lambda r: r[0].patient_id), reverse=direction == "descending"
    )
    return SearchResult(rows[start : start + size], rows, f"{sort_field}-{direction}")


def _counts(
    pairs: list[tuple[Patient, list[Series]]], pick: Callable[[Patient, Series], str]
) -> list[dict[str, object]]:
    counts: dict[str, int] = defaultdict(int)
    for patient, series in pairs:
        for value in sorted({pick(patient, s) for s in series}):
            counts[value] += 1
    return [{"value": v, "count": n} for v, n in sorted(counts.items())]


def summary_json(dataset: Dataset, result: SearchResult) -> dict[str, object]:
    """The getSimpleSearch / ...Paged summary object."""
    result_set = []
    max_tp: dict[str, int] = {}
    min_tp: dict[str, int] = {}
    for _, series in result.all_patients:
        studies = [dataset.study(uid) for uid in dict.fromkeys(s.study_uid for s in series)]
        for st in studies:
            if st.event_type is not None and st.event_offset is not None:
                max_tp[st.event_type] = max(
                    max_tp.get(st.event_type, st.event_offset), st.event_offset
                )
                min_tp[st.event_type] = min(
                    min_tp.get(st.event_type, st.event_offset), st.event_offset
                )
    for patient, series in result.patients:
        studies = [dataset.study(uid) for uid in dict.fromkeys(s.study_uid for s in series)]
        timepoints: dict[str, list[int]] = defaultdict(list)
        for st in studies:
            if st.event_type is not None and st.event_offset is not None:
                timepoints[st.event_type].append(st.event_offset)
        result_set.append(
            {
                "subjectId": patient.patient_id,
                "project": patient.collection,
                "id": patient.pk,
                "modalities": sorted({s.modality for s in series}),
                "bodyParts": sorted({s.body_part for s in series}),
                "species": [patient.species[0]],
                "timepoints": dict(timepoints),
                "totalNumberOfStudies": len(studies),
                "totalNumberOfSeries": len(series),
                "studyIdentifiers": [
                    {
                        "seriesIdentifiers": [s.pk for s in series if s.study_uid == st.uid],
                        "seriesAndModality": [],
                        "studyIdentifier": st.pk,
                    }
                    for st in studies
                ],
            }
        )
    pairs = result.all_patients
    return {
        "resultSet": result_set,
        "totalPatients": len(pairs),
        "bodyParts": _counts(pairs, lambda p, s: s.body_part),
        "modalities": _counts(pairs, lambda p, s: s.modality),
        "collections": _counts(pairs, lambda p, s: s.collection),
        "species": _counts(pairs, lambda p, s: p.species[0]),
        "maxTimepoints": max_tp,
        "minTimepoints": min_tp,
        "sort": result.sort,
    }


def manifest(server_name: str, series_uids: list[str], include_annotation: bool) -> bytes:
    """ManifestMaker's exact text: fixed header, one UID per line, trailing newline."""
    host = (
        f"{server_name}.cancerimagingarchive.net"
        if server_name == "nlst"
        else "nbia.cancerimagingarchive.net"
    )
    lines = [
        f"downloadServerUrl=https://{host}/nbia-download/servlet/DownloadServlet",
        f"includeAnnotation={'true' if include_annotation else 'false'}",
        "noOfrRetry=4",
        f"databasketId=manifest-{int(time.time() * 1000)}.tcia",
        "manifestVersion=3.0",
        "ListOfSeriesToDownload=",
    ]
    return "".join(line + "\n" for line in lines + series_uids).encode()

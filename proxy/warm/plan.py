"""What a client of a cohort asks NBIA for, as a list of requests (pure: no I/O).

The requests mirror tcia-utils' own (same endpoints, same parameter names, no ``format``), because
the cache keys on the exact query and form: a warm request only serves a client later if the
client asks the very same thing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: The v4 API, as tcia-utils calls it.
PREFIX = "/nbia-api/services/v4/"
#: tcia-utils' getSeriesList sends at most this many UIDs per getSeriesMetadata POST.
METADATA_BATCH = 10_000
#: The zip variants: the name a user gives, and the endpoint and query of its download.
VARIANTS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    # tcia-utils downloadSeries: getImage?NewFileNames=Yes&SeriesInstanceUID=...
    "tcia-utils": ("getImage", (("NewFileNames", "Yes"),)),
    "plain": ("getImage", ()),
    "md5": ("getImageWithMD5Hash", ()),
}
DEFAULT_VARIANT = "tcia-utils"

Kind = Literal["metadata", "image"]


class ManifestError(ValueError):
    """A manifest file that is not NBIA's manifest format (or a series file, a UID that is
    not one)."""


#: What a series UID may be: DICOM's are digits and dots (64 at most); anything printable but
#: white space and a comma (which would split the comma-joined getSeriesMetadata list into
#: other UIDs) is left for NBIA to judge, up to 128 characters.
_UID = re.compile(r"[!-+\--~]{1,128}")


@dataclass(frozen=True)
class Cohort:
    """What to warm: a collection (optionally filtered), and/or explicit series."""

    collection: str | None = None
    modality: str | None = None
    body_part: str | None = None
    series: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One request to the gateway; ``series`` names the series an image request downloads."""

    method: Literal["GET", "POST"]
    endpoint: str
    query: tuple[tuple[str, str], ...] = ()
    form: tuple[tuple[str, str], ...] = ()
    kind: Kind = "metadata"
    series: str | None = None
    variant: str | None = None

    @property
    def path(self) -> str:
        return PREFIX + self.endpoint

    def describe(self) -> str:
        """A short text for progress lines and failure reasons."""
        query = "&".join(f"{k}={v}" for k, v in self.query)
        return self.endpoint + (f"?{query}" if query else "")


def parse_manifest(text: str) -> list[str]:
    """The series UIDs of an NBIA manifest (``.tcia``): the lines after
    ``ListOfSeriesToDownload=`` (nbia-api.md §4), in order, without repeats."""
    lines = [line.strip() for line in text.splitlines()]
    if not lines or not lines[0].startswith("downloadServerUrl"):
        raise ManifestError("is not an NBIA manifest (its first line is not downloadServerUrl=)")
    try:
        start = lines.index("ListOfSeriesToDownload=") + 1
    except ValueError:
        raise ManifestError("is not an NBIA manifest (no ListOfSeriesToDownload= line)") from None
    return unique(_uids(enumerate(lines[start:], start + 1)))


def parse_series_file(text: str) -> list[str]:
    """Series UIDs, one a line; blank lines and ``#`` comments skipped."""
    lines = [line.strip() for line in text.splitlines()]
    return unique(_uids((n, line) for n, line in enumerate(lines, 1) if not line.startswith("#")))


def check_uid(uid: str) -> str | None:
    """Why ``uid`` cannot be a series UID, or None if it can."""
    if _UID.fullmatch(uid):
        return None
    shown = uid if len(uid) <= 40 else uid[:40] + "..."
    return f"{shown!r} is not a series UID (DICOM UIDs are digits and dots)"


def _uids(lines: Iterable[tuple[int, str]]) -> Iterable[str]:
    """The non-blank ``(number, stripped line)`` lines, each checked to be a UID."""
    for number, line in lines:
        if not line:
            continue
        problem = check_uid(line)
        if problem is not None:
            raise ManifestError(f"line {number}: {problem}")
        yield line


def unique(items: Iterable[str]) -> list[str]:
    """``items`` in order, each once."""
    return list(dict.fromkeys(items))


def series_query(cohort: Cohort) -> tuple[tuple[str, str], ...]:
    """tcia-utils ``getSeries(collection, modality=..., bodyPart=...)``'s query."""
    pairs = [("Collection", cohort.collection), ("Modality", cohort.modality)]
    pairs.append(("BodyPartExamined", cohort.body_part))
    return tuple((name, value) for name, value in pairs if value)


def collection_requests(collection: str, cohort: Cohort | None = None) -> list[Request]:
    """The lists a client browsing ``collection`` asks for (tcia-utils getCollections,
    getSeries, getPatient, getStudy, getModalityValues, getBodyPartValues)."""
    plain = (("Collection", collection),)
    requests = [
        Request("GET", "getCollectionValues"),
        Request("GET", "getSeries", plain),
        Request("GET", "getPatient", plain),
        Request("GET", "getPatientStudy", plain),
        Request("GET", "getModalityValues", plain),
        Request("GET", "getBodyPartValues", plain),
    ]
    if cohort is not None and cohort.collection == collection and series_query(cohort) != plain:
        requests.append(Request("GET", "getSeries", series_query(cohort)))
    return requests


def metadata_requests(series: Sequence[str]) -> list[Request]:
    """One getSeriesMetadata POST per batch of series (as tcia-utils getSeriesList batches
    them), then each series' getSeriesSize."""
    batches = [
        Request("POST", "getSeriesMetadata", form=(("list", ",".join(series[i : i + n])),))
        for i, n in ((i, METADATA_BATCH) for i in range(0, len(series), METADATA_BATCH))
    ]
    sizes = [
        Request("GET", "getSeriesSize", (("SeriesInstanceUID", uid),), series=uid) for uid in series
    ]
    return batches + sizes


def image_requests(series: Sequence[str], variants: Sequence[str]) -> list[Request]:
    """The zip downloads: each series in each variant."""
    requests = []
    for uid in series:
        for variant in variants:
            endpoint, extra = VARIANTS[variant]
            query = (*extra, ("SeriesInstanceUID", uid))
            requests.append(
                Request("GET", endpoint, query, kind="image", series=uid, variant=variant)
            )
    return requests


def series_rows(body: bytes) -> list[dict[str, Any]]:
    """The rows of a v4 JSON list answer (an empty body is NBIA's empty list)."""
    if not body.strip():
        return []
    try:
        rows = json.loads(body)
    except ValueError:
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def series_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The SeriesInstanceUIDs of getSeries rows, in order."""
    return unique(
        row["SeriesInstanceUID"] for row in rows if isinstance(row.get("SeriesInstanceUID"), str)
    )


def collections_of_metadata(body: bytes) -> list[str]:
    """The collections a getSeriesMetadata CSV answer names (column ``Collection``)."""
    text = body.decode("utf-8", "replace")
    reader = csv.DictReader(io.StringIO(text))
    return unique(
        row["Collection"]
        for row in reader
        if isinstance(row.get("Collection"), str) and row["Collection"]
    )


def expected_size(body: bytes) -> int | None:
    """``TotalSizeInBytes`` of a getSeriesSize answer (the DICOM bytes; a zip is a bit more)."""
    rows = series_rows(body)
    value = rows[0].get("TotalSizeInBytes") if rows else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None

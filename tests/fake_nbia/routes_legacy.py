"""v1 (public), v2 (token) and root "Advanced" (token) resources, plus token/logout."""

from __future__ import annotations

import datetime as dt

from . import routes_v4 as v4
from .dataset import Series
from .responses import (
    ApiError,
    Reply,
    bad_request,
    dumps,
    empty,
    json_reply,
    rows_reply,
    server_error,
    text,
)
from .routing import Call, route
from .search import run_search, summary_json
from .tables import CONTENTS_BY_NAME, METADATA2, METADATA_V1, PATIENT_V1, SERIES_V1, same

# v1 and v2 share handlers; v2 differs only in needing a token (checked by the app)
for gen in ("v1", "v2"):
    route(gen, "getCollectionValues")(v4.collection_values)
    route(gen, "getModalityValues")(v4.modality_values)
    route(gen, "getBodyPartValues")(v4.body_part_values)
    route(gen, "getManufacturerValues")(v4.manufacturer_values)


@route("v1", "getPatient")
@route("v2", "getPatient")
def patients_v1(call: Call) -> Reply:
    rows = []
    for p in call.fake.dataset.patients:
        has_series = any(
            s.patient_id == p.patient_id and s.collection == p.collection
            for s in call.fake.dataset.series
        )
        if (
            has_series
            and same(p.collection, call.get("Collection"))
            and same(p.patient_id, call.get("PatientId"))
        ):
            row = call.fake.tables.patient_v4(p)
            row["PatientBirthDate"] = None
            rows.append(row)
    return rows_reply(rows, PATIENT_V1, call.get("format"))


def _legacy_since(call: Call) -> dt.date | None:
    """v1/v2 NewPatientsInCollection and NewStudiesInPatientCollection: ``Date`` (not
    ``fromDate``) in yyyy/MM/dd; an unparseable one drops the filter (PatientDAOImpl)."""
    if not call.get("Collection") or not call.get("Date"):
        raise bad_request("Collection and Date are required")
    try:
        return dt.datetime.strptime(call.get("Date") or "", "%Y/%m/%d").date()
    except ValueError:
        return None


@route("v1", "NewPatientsInCollection")
@route("v2", "NewPatientsInCollection")
def new_patients_v1(call: Call) -> Reply:
    since = _legacy_since(call)
    rows = v4._patients_with_series(
        call, call.get("Collection"), lambda s: since is None or s.released > since
    )
    for row in rows:
        row["PatientBirthDate"] = None
    return rows_reply(rows, PATIENT_V1, call.get("format"))


@route("v1", "NewStudiesInPatientCollection")
@route("v2", "NewStudiesInPatientCollection")
def new_studies_v1(call: Call) -> Reply:
    since = _legacy_since(call)
    c, p = call.get("Collection"), call.get("PatientID")
    return v4._studies(
        call,
        lambda s: (
            same(s.collection, c)
            and same(s.patient_id, p)
            and (since is None or s.released > since)
        ),
    )


@route("v1", "getSeries")
@route("v2", "getSeries")
def series_v1(call: Call) -> Reply:
    found = call.fake.tables.series_where(*(call.get(p) for p in v4.SERIES_FILTERS))
    return rows_reply([call.fake.tables.series_v1(s) for s in found], SERIES_V1, call.get("format"))


UPDATED_V1 = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "ProtocolName",
    "SeriesDate",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "Collection",
    "PatientID",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ImageCount",
    "TimeStamp",
    "DateReleased",
)


@route("v1", "getUpdatedSeries")
@route("v2", "getUpdatedSeries")
def updated_series_v1(call: Call) -> Reply:
    raw = call.get("fromDate") or "01/01/1900"
    try:
        since = dt.datetime.strptime(raw, "%d/%m/%Y").date()
    except ValueError:
        raise server_error(f'Unparseable date: "{raw}"') from None
    found = [s for s in call.fake.dataset.series if s.released > since]
    return rows_reply(
        [call.fake.tables.series_v1(s) for s in found], UPDATED_V1, call.get("format")
    )


@route("v1", "getSeriesMetaData")
@route("v2", "getSeriesMetaData")
def series_metadata_v1(call: Call) -> Reply:
    uid = call.require("SeriesInstanceUID")
    rows = [call.fake.tables.metadata_v1(s) for s in call.fake.tables.series_in([uid])]
    return rows_reply(rows, METADATA_V1, call.get("format"))


@route("v1", "getContentsByName")
@route("v2", "getContentsByName")
def contents_by_name(call: Call) -> Reply:
    """A shared cart's series; JSON only (format is ignored)."""
    name = call.require("name")
    uids = call.fake.shared_cart(name)
    rows = [call.fake.tables.contents_by_name(s) for s in call.fake.tables.series_in(uids)]
    if not rows:
        return empty()
    return json_reply([{k: r[k] for k in CONTENTS_BY_NAME if r.get(k) is not None} for r in rows])


# --- root "Advanced" ----------------------------------------------------------


def _criteria_counts(pairs: list[tuple[str, int]]) -> Reply:
    """The root shape: [{"criteria": value, "count": "<string>"}]."""
    if not pairs:
        return empty()
    return json_reply([{"criteria": v, "count": str(n)} for v, n in pairs])


@route("root", "getCollectionValuesAndCounts")
def collection_counts_root(call: Call) -> Reply:
    return _criteria_counts(v4.count_rows(call.fake.dataset.series, lambda s: s.collection))


@route("root", "getModalityValuesAndCounts")
def modality_counts_root(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"), body_part=call.get("BodyPartExamined")
    )
    return _criteria_counts(v4.count_rows(found, lambda s: s.modality))


@route("root", "getBodyPartValuesAndCounts")
def body_part_counts_root(call: Call) -> Reply:
    found = call.fake.tables.series_where(call.get("Collection"), modality=call.get("Modality"))
    return _criteria_counts(v4.count_rows(found, lambda s: s.body_part))


@route("root", "getManufacturerValuesAndCounts")
def manufacturer_counts_root(call: Call) -> Reply:
    found = call.fake.tables.series_where(
        call.get("Collection"),
        modality=call.get("Modality"),
        body_part=call.get("BodyPartExamined"),
    )
    return _criteria_counts(v4.count_rows(found, lambda s: s.manufacturer))


@route("root", "getSpeciesValuesAndCounts")
def species_counts_root(call: Call) -> Reply:
    return _criteria_counts(v4.species_pairs(call))


@route("root", "getCollectionDescriptions")
def collection_descriptions_root(call: Call) -> Reply:
    rows = v4.description_rows(call, root=True)
    return Reply(200, dumps(rows), "application/json") if rows else empty()


@route("root", "getSimpleSearchWithModalityAndBodyPartPaged", "POST")
def simple_search_paged(call: Call) -> Reply:
    return json_reply(summary_json(call.fake.dataset, run_search(call, True)))


@route("root", "getManifestForSimpleSearch", "POST")
def manifest_for_simple_search_root(call: Call) -> Reply:
    return v4.manifest_for_search(call, legacy_dates=True)


@route("root", "getRestrictionsForSimpleSearch", "POST")
def restrictions_root(call: Call) -> Reply:
    return v4.restrictions(call, legacy_dates=True)


@route("root", "getSeriesMetadata2", "POST")
def series_metadata2(call: Call) -> Reply:
    rows = [call.fake.tables.metadata2(s) for s in v4.series_list(call)]
    return rows_reply(rows, METADATA2, "csv-download")


@route("root", "createSharedList", "POST")
def create_shared_list(call: Call) -> Reply:
    name = call.get("name")
    if name is None:
        raise server_error("null")
    uids = [u for value in call.get_all("list") for u in value.split(",") if u]
    known: list[Series] = call.fake.tables.series_in(uids)
    if len({s.uid for s in known}) != len(set(uids)):
        raise bad_request("User does not have permission for all series in list")
    if not call.fake.add_shared_list(
        name, uids, call.user or "", call.get("description"), call.get("url")
    ):
        raise bad_request("Duplicate list name")
    return text("List created")


# --- token and logout -----------------------------------------------------------


def _keycloak_error(status: int, error: str, description: str) -> ApiError:
    body = dumps({"error": error, "error_description": description})
    return ApiError(Reply(status, body, "application/json"))


@route("auth", "oauth/token", "POST")
def token(call: Call) -> Reply:
    """KeycloakGetToken: form parameters only; Keycloak's status and body verbatim."""
    fake = call.fake
    grant_type = call.get("grant_type")
    if grant_type is None:
        raise server_error("null")  # NullPointerException in the resource
    if grant_type == "password":
        username = call.get("username")
        if not fake.tokens.check_password(username, call.get("password")):
            raise _keycloak_error(401, "invalid_grant", "Invalid user credentials")
        fake.tokens.password_grants += 1
        return json_reply(fake.tokens.issue(username or ""))
    if grant_type == "refresh_token":
        grant = fake.tokens.take_refresh(call.get("refresh_token"))
        if grant is None:
            raise _keycloak_error(400, "invalid_grant", "Token is not active")
        fake.tokens.refresh_grants += 1
        return json_reply(fake.tokens.issue(grant.user, grant.session))
    # Response.status(0, ...): not a real status; Tomcat sends a 500
    raise ApiError(
        text("Wrong grant_type entered. Valid grant_type is password or refresh_token.", 500)
    )


@route("auth", "logout", "POST")
def logout(call: Call) -> Reply:
    header = call.bearer()
    if header is None or header == "Bearer undefined":
        raise ApiError(text("No valid token.", 500))  # Response.status(0, "No valid token.")
    call.fake.tokens.logout(header[7:])
    return empty(204)

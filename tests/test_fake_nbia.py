"""Tests of the fake NBIA upstream itself (tests/fake_nbia)."""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import re
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from proxy.binary.verdict import Verdict
from proxy.binary.zipcheck import Md5Policy, ZipCheck
from tests.fake_nbia import FakeNBIA, FakeServer, LoggedRequest

# nbia_upstream / nlst_upstream come from tests.fake_nbia.fixtures, which the root
# conftest loads with pytest_plugins

V4 = "/nbia-api/services/v4/"
V1 = "/nbia-api/services/v1/"
V2 = "/nbia-api/services/v2/"
ROOT = "/nbia-api/services/"
TOKEN = "/nbia-api/oauth/token"
SERVER_ERROR = "Server was not able to process your request"


@pytest.fixture
def fake(nbia_upstream: FakeServer) -> FakeNBIA:
    return nbia_upstream.app


@pytest.fixture
def client(nbia_upstream: FakeServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=nbia_upstream.url, timeout=10) as c:
        yield c


def series_of(fake: FakeNBIA, modality: str, big: bool = False) -> str:
    return next(s.uid for s in fake.dataset.series if s.modality == modality and s.big == big)


def login(client: httpx.Client, user: str = "nbia_guest", password: str = "") -> dict[str, Any]:
    r = client.post(
        TOKEN,
        data={
            "username": user,
            "password": password,
            "client_id": "NBIA",
            "grant_type": "password",
        },
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- generic output rules ---------------------------------------------------------


def test_collection_values_in_every_format(client: httpx.Client) -> None:
    r = client.get(V4 + "getCollectionValues")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == [
        {"Collection": "4D-Lung"},
        {"Collection": "Soft-tissue-Sarcoma"},
        {"Collection": "TCGA-KIRC"},
    ]
    assert r.text.startswith('[{"Collection":"4D-Lung"}')  # compact, like org.json

    r = client.get(V4 + "getCollectionValues", params={"format": "csv"})
    assert r.headers["content-type"] == "text/csv"
    assert r.text.splitlines() == ["Collection", "4D-Lung", "Soft-tissue-Sarcoma", "TCGA-KIRC"]
    r = client.get(V4 + "getCollectionValues", params={"format": "html"})
    assert r.headers["content-type"] == "text/html" and "<td>TCGA-KIRC</td>" in r.text
    r = client.get(V4 + "getCollectionValues", params={"format": "xml"})
    assert r.headers["content-type"] == "application/xml"
    assert r.text.startswith("<Results><Row><Col type='java.lang.String'>4D-Lung</Col>")

    for bad in ("yaml", "JSON", "csvquoted"):  # csvquoted is for multi-column lists only
        r = client.get(V4 + "getCollectionValues", params={"format": bad})
        assert r.status_code == 500
        assert r.headers["content-type"] == "text/plain"
        assert r.text == SERVER_ERROR


def test_multi_column_formats(client: httpx.Client) -> None:
    r = client.get(V4 + "getPatient", params={"Collection": "TCGA-KIRC", "format": "csvquoted"})
    lines = r.text.splitlines()
    assert lines[0].startswith('"PatientId","PatientName","PatientSex"')
    assert lines[1].startswith('"TCGA-B0-4710","TCGA-B0-4710","M","",')
    r = client.get(V4 + "getPatient", params={"Collection": "TCGA-KIRC", "format": "csv-download"})
    assert r.headers["content-disposition"] == 'attachment; filename="SeriesMetaData.csv"'


def test_empty_result_is_a_bare_200(client: httpx.Client) -> None:
    for path, params in [
        ("getPatient", {"Collection": "CPTAC-SAR"}),
        ("getSeries", {"Collection": "CPTAC-SAR"}),
        ("getSeries", {"Modality": "PT"}),
        ("getUpdatedSeries", {"fromDate": "01-01-2030"}),
    ]:
        r = client.get(V4 + path, params=params)
        assert r.status_code == 200
        assert r.content == b""  # not "[]"
        assert "content-type" not in r.headers


def test_null_values_are_omitted(client: httpx.Client) -> None:
    rows = client.get(V4 + "getPatient", params={"Collection": "4D-Lung"}).json()
    assert rows and all("EthnicGroup" not in row for row in rows)
    assert rows[0]["PatientId"] == "100_HM10395" and rows[0]["Authorized"] == 1


def test_strict_allow_lists(client: httpx.Client, fake: FakeNBIA) -> None:
    r = client.get(V4 + "getSeries", params={"Collection": "4D-Lung", "api_key": "x"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.text.startswith("Invalid query parameter: 'api_key'. Allowed parameters are: [")
    assert "ManufacturerModelName" in r.text
    r = client.get(V4 + "getSeries", params={"collection": "4D-Lung"})  # case-sensitive
    assert r.status_code == 400
    r = client.post(V4 + "getThumbnail", data={"seriesUID": "1", "objectUID": "2", "x": "1"})
    assert r.status_code == 400
    assert r.text == ("Invalid form parameter: 'x'. Allowed parameters are: [seriesUID, objectUID]")
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": "1", "format": "json"})
    assert r.status_code == 400 and "'format'" in r.text
    # endpoints the catalog lists as unchecked accept anything
    uid = series_of(fake, "CT")
    r = client.post(V4 + "getSeriesMetadata", data={"list": uid, "cachebuster": "1"})
    assert r.status_code == 200
    assert client.get(V4 + "getCollectionValuesAndCounts", params={"x": "1"}).status_code == 200
    # v1 has no allow-list
    assert client.get(V1 + "getCollectionValues", params={"x": "1"}).status_code == 200


def test_missing_required_parameters(client: httpx.Client) -> None:
    r = client.get(V4 + "getSeriesSize")
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.text == "A parameter, SeriesInstanceUID, is required for this API call."
    r = client.get(V4 + "getPatientByCollectionAndModality", params={"Collection": "4D-Lung"})
    assert r.text == "A parameter, Modality, is required for this API call."
    r = client.post(V4 + "getSeriesMetadata", data={})
    assert r.status_code == 400 and "A form parameter, list," in r.text


def test_routing_methods_and_case(client: httpx.Client) -> None:
    assert client.post(V4 + "getCollectionValues").status_code == 405
    assert client.get(V4 + "getSimpleSearch").status_code == 405
    assert client.get(V4 + "getcollectionvalues").status_code == 404
    assert (
        client.get(V4 + "getSeriesMetaData", params={"SeriesInstanceUID": "1"}).status_code == 404
    )  # v1 spelling, v4 path
    assert client.get("/nbia-api/services/v9/getSeries").status_code == 404
    assert client.get("/other").status_code == 404
    # the Keycloak build also mounts Jersey without /services
    assert client.get("/nbia-api/v4/getCollectionValues").status_code == 200
    head = client.head(V4 + "getCollectionValues")
    assert head.status_code == 200 and head.content == b""


def test_v4_series_rows(client: httpx.Client, fake: FakeNBIA) -> None:
    rows = client.get(V4 + "getSeries", params={"Collection": "soft-tissue-sarcoma"}).json()
    assert {r["PatientID"] for r in rows} == {"STS_001", "STS_002"}  # SQL collation
    row = next(r for r in rows if r["SeriesDescription"] == "2. AXIAL T1 BOTH LEGS - RESEARCH")
    assert row["StudyDate"] == "12-12-2003" and re.fullmatch(
        r"\d\d-\d\d-\d{4}", row["DateReleased"]
    )
    assert row["ImageCount"] == 3 and row["Manufacturer"] == "GE MEDICAL SYSTEMS"
    assert row["LicenseURI"] == "https://creativecommons.org/licenses/by/3.0/"
    assert "AnnotationsFlag" not in row  # null
    size = client.get(
        V4 + "getSeriesSize", params={"SeriesInstanceUID": row["SeriesInstanceUID"]}
    ).json()
    assert size == [{"TotalSizeInBytes": row["FileSize"], "ObjectCount": 3}]
    sops = client.get(
        V4 + "getSOPInstanceUIDs", params={"SeriesInstanceUID": row["SeriesInstanceUID"]}
    ).json()
    assert len(sops) == 3 and set(sops[0]) == {"SOPInstanceUID"}
    updated = client.get(V4 + "getUpdatedSeries", params={"fromDate": "01-01-2020"}).json()
    assert {r["Modality"] for r in updated} == {"SEG", "MR"}
    v1 = client.get(V1 + "getSeries", params={"Collection": "TCGA-KIRC"}).json()
    assert v1[0]["SeriesDate"].endswith(" 00:00:00.0") and "CollectionURI" in v1[0]


def test_series_metadata_csv(client: httpx.Client, fake: FakeNBIA) -> None:
    ct, mr = series_of(fake, "CT"), series_of(fake, "MR")
    r = client.post(V4 + "getSeriesMetadata", data={"list": [f"{ct},{mr}", "1.2.3"]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/csv"
    assert r.headers["content-disposition"] == 'attachment; filename="SeriesMetaData.csv"'
    rows = list(csv.reader(io.StringIO(r.text)))
    assert len(rows[0]) == 40 and rows[0][0] == "PatientID"
    assert {row[rows[0].index("SeriesInstanceUID")] for row in rows[1:]} == {ct, mr}
    assert r.text.startswith('"PatientID","PatientName"')
    r = client.post(V4 + "getSeriesMetadata", data={"list": ct, "format": "json"})
    assert r.json()[0]["SeriesInstanceUID"] == ct
    assert client.post(V4 + "getSeriesMetadata", data={"list": "9.9"}).content == b""


# --- zips and images -----------------------------------------------------------------------


def _zip(r: httpx.Response) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(r.content))


def test_get_image_zip(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "MR")
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == f'attachment; filename="{uid}.zip"'
    assert r.headers["transfer-encoding"] == "chunked" and "content-length" not in r.headers
    zf = _zip(r)
    assert zf.namelist() == ["LICENSE", "00000001.dcm", "00000002.dcm", "00000003.dcm"]
    assert b"Creative Commons" in zf.read("LICENSE")
    sops = set()
    for name in zf.namelist()[1:]:
        ds = pydicom.dcmread(io.BytesIO(zf.read(name)))
        assert ds.SeriesInstanceUID == uid and ds.Modality == "MR"
        assert ds.pixel_array.shape == (32, 32)
        sops.add(ds.SOPInstanceUID)
    listed = client.get(V4 + "getSOPInstanceUIDs", params={"SeriesInstanceUID": uid}).json()
    assert sops == {row["SOPInstanceUID"] for row in listed}
    again = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid})
    assert again.content == r.content  # deterministic
    total = sum(i.file_size for i in zf.infolist() if i.filename.endswith(".dcm"))
    assert (
        client.get(V4 + "getSeriesSize", params={"SeriesInstanceUID": uid}).json()[0][
            "TotalSizeInBytes"
        ]
        == total
    )


def _check_md5s(zf: zipfile.ZipFile) -> list[str]:
    lines = zf.read("md5hashes.csv").decode().splitlines()
    assert lines[0] == "Filename,MD5Hash"
    names = []
    for line in lines[1:]:
        name, digest = line.split(",")
        assert hashlib.md5(zf.read(name)).hexdigest() == digest
        pydicom.dcmread(io.BytesIO(zf.read(name)))
        names.append(name)
    return names


def test_zip_variants(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "CT")
    names = _zip(
        client.get(V4 + "getImage", params={"SeriesInstanceUID": uid, "NewFileNames": "Yes"})
    ).namelist()
    assert names[0] == "LICENSE" and all(re.fullmatch(r"\d+-\d\d\.dcm", n) for n in names[1:])
    zf = _zip(client.get(V4 + "getImage", params={"SeriesInstanceUID": uid, "IncludeMD5": "yes"}))
    assert zf.namelist()[0] == "LICENSE" and zf.namelist()[-1] == "md5hashes.csv"
    assert len(_check_md5s(zf)) == len(zf.namelist()) - 2
    zf = _zip(client.get(V4 + "getImageWithMD5Hash", params={"SeriesInstanceUID": uid}))
    assert "LICENSE" not in zf.namelist()
    assert _check_md5s(zf) == zf.namelist()[:-1]


def test_image_access_errors(client: httpx.Client) -> None:
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": "1.2.3"})
    assert r.status_code == 400
    assert r.text == (
        "The user has not been granted the access to image with given "
        "SeriesInstanceUID,1.2.3. Please contact System Admin to resolve this "
        "issue."
    )
    r = client.get(V1 + "getImage", params={"SeriesInstanceUID": "1.2.3"})
    assert r.text == "Image with given SeriesInstanceUID,1.2.3, is not in public domain."


def test_single_image_and_hashes(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "CT")
    sop = client.get(V4 + "getSOPInstanceUIDs", params={"SeriesInstanceUID": uid}).json()[0][
        "SOPInstanceUID"
    ]
    r = client.get(V4 + "getSingleImage", params={"SeriesInstanceUID": uid, "SOPInstanceUID": sop})
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["content-disposition"] == f"attachment; filename={sop}.dcm"
    assert pydicom.dcmread(io.BytesIO(r.content)).SOPInstanceUID == sop
    token = login(client)["access_token"]
    md5 = client.get(
        V2 + "getM5HashForImage", params={"SOPInstanceUid": sop}, headers=bearer(token)
    )
    assert md5.headers["content-type"] == "text/plain"
    assert md5.text == hashlib.md5(r.content).hexdigest()
    h = client.post(V4 + "getMD5Hierarchy", data={"SeriesInstanceUID": uid})
    assert re.fullmatch(r"[0-9a-f]{32}", h.text)  # no newline
    c = client.post(V4 + "getMD5Hierarchy", data={"Collection": "4D-Lung"})
    assert re.fullmatch(r"[0-9a-f]{32}", c.text) and c.text != h.text


def test_thumbnail_is_a_jpeg(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "MR")
    sop = fake.images.instances(uid)[0].sop_uid
    r = client.post(V4 + "getThumbnail", data={"seriesUID": uid, "objectUID": sop})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8" and r.content[-2:] == b"\xff\xd9"
    assert b"\xff\xc0" in r.content and b"JFIF" in r.content  # baseline frame
    assert (
        client.post(V4 + "getThumbnail", data={"seriesUID": uid, "objectUID": "1"}).status_code
        == 400
    )


@pytest.mark.parametrize(
    ("path", "extra", "md5"),
    [
        (V4 + "getDCMImage", {}, False),
        (V4 + "getDCMImage", {"MD5Verification": "yes"}, True),
        (V2 + "getDCMImage", {"MD5Verification": "Yes"}, True),
        (V1 + "getDCMImage", {"IncludeAnnotation": "true"}, False),
        (V4 + "getImageOther", {}, False),
        (V1 + "getImageOther", {}, False),
    ],
)
def test_dcm_image_and_image_other_zips(
    client: httpx.Client, fake: FakeNBIA, path: str, extra: dict[str, str], md5: bool
) -> None:
    uid = series_of(fake, "CT")
    auth = bearer(login(client)["access_token"]) if path.startswith(V2) else {}
    r = client.get(path, params={"SeriesInstanceUID": uid, **extra}, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == f'attachment; filename="{uid}.zip"'
    names = _zip(r).namelist()
    # original file names, no LICENSE, the hashes only when asked for
    images = names[:-1] if md5 else names
    assert images and all(re.fullmatch(r"\d+-\d\d\.dcm", n) for n in images)
    if md5:
        assert _check_md5s(_zip(r)) == images
    missing = client.get(path, params=extra, headers=auth)
    assert missing.status_code == 400
    assert missing.text == "A parameter, SeriesInstanceUID, is required for this API call."


def test_dcm_image_and_image_other_allow_lists(client: httpx.Client) -> None:
    r = client.get(V4 + "getDCMImage", params={"SeriesInstanceUID": "1", "NewFileNames": "yes"})
    assert r.status_code == 400 and r.text.startswith("Invalid query parameter: 'NewFileNames'")
    r = client.get(V4 + "getImageOther", params={"SeriesInstanceUID": "1", "IncludeMD5": "yes"})
    assert r.text == (
        "Invalid query parameter: 'IncludeMD5'. Allowed parameters are: [SeriesInstanceUID]"
    )
    assert client.get(V2 + "getImageOther").status_code == 404  # not in v2


def _wado_params(fake: FakeNBIA, **extra: str) -> dict[str, str]:
    uid = series_of(fake, "CT")
    series = fake.dataset.find_series(uid)
    assert series is not None
    sop = fake.images.instances(uid)[0].sop_uid
    ids = {"studyUID": series.study_uid, "seriesUID": uid, "objectUID": sop}
    return {"requestType": "WADO", **ids, **extra}


def test_wado_answers_a_jpeg_or_the_dicom_file(client: httpx.Client, fake: FakeNBIA) -> None:
    params = _wado_params(fake)
    jpeg = client.get(V1 + "wado", params=params)
    assert (jpeg.status_code, jpeg.headers["content-type"]) == (200, "image/jpeg")
    assert jpeg.content[:2] == b"\xff\xd8" and jpeg.content[-2:] == b"\xff\xd9"
    asked = client.get(V1 + "wado", params={**params, "contentType": "image/jpeg"})
    assert asked.content == jpeg.content  # image/jpeg is WADO-URI's default
    bigger = client.get(V1 + "wado", params={**params, "rows": "40", "columns": "20"})
    assert b"\xff\xc0\x00\x0b\x08\x00\x28\x00\x28" in bigger.content  # 40x40 frame
    dicom = client.get(V1 + "wado", params={**params, "contentType": "application/dicom"})
    assert dicom.headers["content-type"] == "application/dicom"
    single = client.get(
        V1 + "getSingleImage",
        params={"SeriesInstanceUID": params["seriesUID"], "SOPInstanceUID": params["objectUID"]},
    )
    assert dicom.content == single.content
    # getWado: the same resource as a form POST, on v1 and (with a token) root
    auth = bearer(login(client)["access_token"])
    for path, headers in ((V1 + "getWado", {}), (ROOT + "getWado", auth)):
        as_dicom = {**params, "contentType": "application/dicom"}
        posted = client.post(path, data=as_dicom, headers=headers)
        assert (posted.status_code, posted.content) == (200, dicom.content)
        assert client.post(path, data=params, headers=headers).content == jpeg.content
    assert client.post(V1 + "getWado", params=params).status_code == 400  # form only
    assert client.get(V1 + "getWado", params=params).status_code == 405
    assert client.post(V1 + "wado", data=params).status_code == 405


@pytest.mark.parametrize(
    "change",
    [
        {"requestType": "WADO-RS"},
        {"requestType": ""},
        {"studyUID": "1.2.3"},
        {"objectUID": "1.2.3"},
        {"contentType": "image/png"},
        {"rows": "x"},
        {"columns": "100000"},
    ],
)
def test_wado_errors_are_a_400_text(
    client: httpx.Client, fake: FakeNBIA, change: dict[str, str]
) -> None:
    r = client.get(V1 + "wado", params=_wado_params(fake, **change))
    assert (r.status_code, r.headers["content-type"]) == (400, "text/plain")
    assert r.text.startswith("WADO request failed: ")


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/dicom"])
def test_wado_with_an_altered_image(
    client: httpx.Client, fake: FakeNBIA, content_type: str
) -> None:
    params = _wado_params(fake, contentType=content_type)
    good = client.get(V1 + "wado", params=params).content
    fake.close_zip_after(0, times=1)  # a zip fault: means nothing to one image
    fake.alter_image(2, times=1)  # another image: taken, changes nothing
    fake.alter_image(1, times=1)
    assert client.get(V1 + "wado", params=params).content == good
    bad = client.get(V1 + "wado", params=params).content
    assert (len(bad), bad[:-1]) == (len(good), good[:-1]) and bad != good
    assert client.get(V1 + "wado", params=params).content == good  # times=1: healed


def test_dicom_tags(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "CT")
    tags = client.get(V4 + "getDicomTags", params={"SeriesUID": uid}).json()
    assert tags[1] == {
        "element": "(0002,0001)",
        "name": "File Meta Information Version",
        "data": "00\\01",
    }
    by_element = {t["element"]: t["data"] for t in tags}
    assert by_element["(0008,0060)"] == "CT" and by_element["(0020,000E)"] == uid
    assert client.get(V4 + "getDicomTags", params={"SeriesUID": "1.2"}).status_code == 400


# --- search, manifests, counts, DOIs ----------------------------------------------------


def test_simple_search(client: httpx.Client) -> None:
    form = {
        "criteriaType0": "CollectionCriteria",
        "value0": "4D-Lung",
        "criteriaType1": "ImageModalityCriteria",
        "value1": "CT",
        "sortField": "subject",
        "sortDirection": "descending",
        "start": "0",
        "size": "1",
        "tool": "tcia_utils",
    }
    body = client.post(V4 + "getSimpleSearch", data=form).json()
    assert body["totalPatients"] == 2 and body["sort"] == "subject-descending"
    assert [p["subjectId"] for p in body["resultSet"]] == ["101_HM10395"]  # page of 1
    assert body["collections"] == [{"value": "4D-Lung", "count": 2}]
    assert set(body) == {
        "resultSet",
        "totalPatients",
        "bodyParts",
        "modalities",
        "collections",
        "species",
        "maxTimepoints",
        "minTimepoints",
        "sort",
    }
    study = body["resultSet"][0]["studyIdentifiers"][0]
    assert set(study) == {"seriesIdentifiers", "seriesAndModality", "studyIdentifier"}
    no_sort = {k: v for k, v in form.items() if k != "sortField"}
    assert client.post(V4 + "getSimpleSearch", data=no_sort).status_code == 500


def test_manifest_exact_format(client: httpx.Client, fake: FakeNBIA) -> None:
    form = {
        "criteriaType0": "PatientCriteria",
        "value0": "TCGA-B0-4710",
        "sortField": "subject",
        "sortDirection": "ascending",
        "start": "0",
        "size": "1000000",
    }
    before = int(time.time() * 1000)
    r = client.post(V4 + "getManifestForSimpleSearch", data=form)
    assert r.headers["content-type"] == "application/x-nbia-manifest-file"
    lines = r.text.split("\n")
    assert lines[:3] == [
        "downloadServerUrl=https://nbia.cancerimagingarchive.net/nbia-download/servlet/"
        "DownloadServlet",
        "includeAnnotation=false",
        "noOfrRetry=4",
    ]
    basket = re.fullmatch(r"databasketId=manifest-(\d+)\.tcia", lines[3])
    assert basket and int(basket.group(1)) >= before
    assert lines[4:6] == ["manifestVersion=3.0", "ListOfSeriesToDownload="]
    expected = [s.uid for s in fake.dataset.series if s.patient_id == "TCGA-B0-4710"]
    assert lines[6:] == expected + [""]  # every line ends with \n
    r = client.post(
        V4 + "getManifestText", data={"list": ["1.2", "3.4"], "includeAnnotation": "TRUE"}
    )
    assert r.text.endswith("ListOfSeriesToDownload=\n1.2\n3.4\n")
    assert "\nincludeAnnotation=true\n" in r.text
    assert client.post(V4 + "getManifestText", data={"list": "1.2"}).status_code == 500
    restricted = client.post(V4 + "getRestrictionsForSimpleSearch", data=form)
    assert restricted.text == "yes"  # TCGA-KIRC is non-commercial here
    form["value0"] = "STS_001"
    assert client.post(V4 + "getRestrictionsForSimpleSearch", data=form).text == "no"


def test_counts_and_descriptions(client: httpx.Client) -> None:
    counts = client.get(
        V4 + "getModalityValuesAndCounts", params={"Collection": "TCGA-KIRC"}
    ).json()
    assert counts == [
        {"Modality": "CT", "Count": 1, "Authorized": 1},
        {"Modality": "MR", "Count": 2, "Authorized": 1},
        {"Modality": "SEG", "Count": 1, "Authorized": 1},
    ]
    descriptions = client.get(V4 + "getCollectionDescriptions").json()
    assert "CPTAC-SAR" in {d["collectionName"] for d in descriptions}
    assert all("userName" not in d for d in descriptions)
    tax = client.get(V4 + "getSpeciesTax").json()
    assert {"speciesCode": "337915000", "speciesDescription": "Homo sapiens"} in tax


def test_doi_lookup(client: httpx.Client) -> None:
    r = client.post(
        V4 + "getCollectionOrSeriesForDOI",
        data={"DOI": "10.7937/K9/TCIA.2016.ELN8YGLE", "CollectionOrSeries": ""},
    )
    assert r.text == (
        '[{"collection":"4D-Lung","seriesInstanceUID":null,"thirdPartyAnanlysis":null}]'
    )
    r = client.post(
        V4 + "getCollectionOrSeriesForDOI",
        data={
            "DOI": "https://doi.org/10.7937/K9/TCIA.2016.ELN8YGLE",
            "CollectionOrSeries": "series",
        },
    )
    assert len(r.json()) == 5


# --- tokens and identity ------------------------------------------------------------------


def test_password_grant(client: httpx.Client, fake: FakeNBIA) -> None:
    body = login(client, password="anything")  # guest: any password
    assert set(body) == {
        "access_token",
        "expires_in",
        "refresh_expires_in",
        "refresh_token",
        "token_type",
        "id_token",
        "not-before-policy",
        "session_state",
        "scope",
    }
    assert body["token_type"] == "Bearer" and body["expires_in"] == 7200
    assert body["not-before-policy"] == 0 and body["scope"] == "openid profile email"
    assert fake.password_grants == 1
    assert body["access_token"] in fake.issued_access_tokens

    fake.users["alice"] = "secret"
    assert login(client, "alice", "secret")["access_token"]
    r = client.post(TOKEN, data={"username": "alice", "password": "nope", "grant_type": "password"})
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_grant", "error_description": "Invalid user credentials"}
    assert fake.password_grants == 2

    r = client.post(TOKEN, data={"username": "alice", "password": "secret"})
    assert r.status_code == 500 and r.text.startswith(SERVER_ERROR)  # no grant_type
    r = client.post(TOKEN, json={"username": "alice", "grant_type": "password"})
    assert r.status_code == 500  # form parameters only
    assert client.get(TOKEN, params={"grant_type": "password"}).status_code == 405


def test_refresh_and_expiry_on_a_fake_clock(client: httpx.Client, fake: FakeNBIA) -> None:
    now = [1000.0]
    fake.clock = lambda: now[0]
    fake.token_lifetime_seconds = 60
    fake.refresh_lifetime_seconds = 600
    body = login(client)
    assert body["expires_in"] == 60 and body["refresh_expires_in"] == 600
    auth = bearer(body["access_token"])
    assert client.get(V2 + "getCollectionValues", headers=auth).status_code == 200
    now[0] += 61
    r = client.get(V2 + "getCollectionValues", headers=auth)
    assert r.status_code == 401 and r.content == b""
    r = client.post(
        TOKEN,
        data={
            "grant_type": "refresh_token",
            "client_id": "nbia",
            "refresh_token": body["refresh_token"],
        },
    )
    assert r.status_code == 200 and fake.refresh_grants == 1
    assert (
        client.get(V2 + "getCollectionValues", headers=bearer(r.json()["access_token"])).status_code
        == 200
    )
    now[0] += 601
    r = client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    )
    assert r.status_code == 400
    assert r.json() == {"error": "invalid_grant", "error_description": "Token is not active"}


def test_expire_revoke_and_logout(client: httpx.Client, fake: FakeNBIA) -> None:
    body = login(client)
    fake.expire_access_tokens()
    assert (
        client.get(ROOT + "getSpeciesTax", headers=bearer(body["access_token"])).status_code == 401
    )
    fresh = client.post(
        TOKEN, data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    ).json()
    assert (
        client.get(ROOT + "getSpeciesTax", headers=bearer(fresh["access_token"])).status_code == 200
    )
    fake.revoke_tokens()
    assert (
        client.get(ROOT + "getSpeciesTax", headers=bearer(fresh["access_token"])).status_code == 401
    )
    assert (
        client.post(
            TOKEN, data={"grant_type": "refresh_token", "refresh_token": fresh["refresh_token"]}
        ).status_code
        == 400
    )

    body = login(client)
    assert client.post("/nbia-api/logout").status_code == 500
    r = client.post("/nbia-api/logout", headers=bearer(body["access_token"]))
    assert r.status_code == 204 and r.content == b""
    assert (
        client.get(V2 + "getCollectionValues", headers=bearer(body["access_token"])).status_code
        == 401
    )


def test_identity_per_generation(client: httpx.Client, fake: FakeNBIA) -> None:
    token = login(client)["access_token"]
    # v4: anonymous works as guest; a bad token is a 401; "Bearer undefined" is the guest
    assert client.get(V4 + "getCollectionValues").status_code == 200
    assert client.get(V4 + "getCollectionValues", headers=bearer("junk")).status_code == 401
    assert (
        client.get(
            V4 + "getCollectionValues", headers={"Authorization": "Bearer undefined"}
        ).status_code
        == 200
    )
    assert (
        client.get(
            V4 + "getCollectionValues", headers={"Authorization": "Bearer: " + token}
        ).status_code
        == 401
    )
    # root without Authorization (what the SEED's malformed "-H 'Authorization Bearer: X'" does)
    r = client.get(ROOT + "getBodyPartValuesAndCounts", headers={"X-Token": token})
    assert r.status_code == 500 and r.text == f"{SERVER_ERROR}\nnull"
    # v1 never reads the header
    assert client.get(V1 + "getCollectionValues", headers=bearer("junk")).status_code == 200
    # v2: missing or invalid -> 401 with an empty body
    for headers in ({}, bearer("junk")):
        r = client.get(V2 + "getSeries", params={"Collection": "4D-Lung"}, headers=headers)
        assert r.status_code == 401 and r.content == b""
    # root: invalid token -> 401; valid token -> the criteria/count shape with string counts
    assert (
        client.get(ROOT + "getModalityValuesAndCounts", headers=bearer("junk")).status_code == 401
    )
    r = client.get(
        ROOT + "getModalityValuesAndCounts", params={"Collection": "4D-Lung"}, headers=bearer(token)
    )
    assert r.json() == [{"criteria": "CT", "count": "2"}, {"criteria": "RTSTRUCT", "count": "1"}]
    logged = fake.requests_to("getModalityValuesAndCounts")[-1]
    assert isinstance(logged, LoggedRequest) and logged.user == "nbia_guest"
    assert logged.headers["authorization"] == f"Bearer {token}"
    fake.require_token_on_v4 = True
    assert client.get(V4 + "getCollectionValues").status_code == 401
    assert client.get(V4 + "getCollectionValues", headers=bearer(token)).status_code == 200


def test_root_advanced_endpoints(client: httpx.Client, fake: FakeNBIA) -> None:
    auth = bearer(login(client)["access_token"])
    form = {
        "criteriaType0": "DateRangeCriteria",
        "fromDate0": "01/01/1997",
        "toDate0": "31/12/1998",
        "sortField": "subject",
        "sortDirection": "ascending",
        "start": "0",
        "size": "10",
    }
    body = client.post(
        ROOT + "getSimpleSearchWithModalityAndBodyPartPaged", data=form, headers=auth
    ).json()
    assert [p["subjectId"] for p in body["resultSet"]] == ["100_HM10395", "101_HM10395"]
    assert body["maxTimepoints"] == {"Radiation Treatment": 14}
    r = client.post(
        ROOT + "getSeriesMetadata2", data={"list": series_of(fake, "SEG")}, headers=auth
    )
    assert r.text.startswith('"Subject ID","Study UID","Study Description","Study Date"')
    assert r.headers["content-disposition"] == 'attachment; filename="SeriesMetaData.csv"'
    r = client.post(ROOT + "getManifestForSimpleSearch", data=form, headers=auth)
    assert r.text.count("\n") == 6 + 5  # 4D-Lung has five series
    assert client.get(ROOT + "getCollectionValuesAndCounts", headers=auth).json()[0] == {
        "criteria": "4D-Lung",
        "count": "2",
    }
    assert client.post(ROOT + "getCollectionValuesAndCounts", headers=auth).status_code == 405


def test_shared_lists(client: httpx.Client, fake: FakeNBIA) -> None:
    r = client.get(V1 + "getContentsByName", params={"name": "nbia-49121659384603347"})
    assert len(r.json()) == 2 and "Date Released" in r.json()[0]
    auth = bearer(login(client)["access_token"])
    uids = [series_of(fake, "MR"), series_of(fake, "SEG")]
    form = {"list": uids, "name": "my-cart", "description": "d", "url": "u"}
    r = client.post(ROOT + "createSharedList", data=form, headers=auth)
    assert r.status_code == 200 and r.text == "List created"
    r = client.post(ROOT + "createSharedList", data=form, headers=auth)
    assert r.status_code == 400 and r.text == "Duplicate list name"
    r = client.post(
        ROOT + "createSharedList", data={**form, "name": "x", "list": "1.2"}, headers=auth
    )
    assert r.text == "User does not have permission for all series in list"
    got = client.get(V1 + "getContentsByName", params={"name": "my-cart"}).json()
    assert {row["SeriesInstanceUID"] for row in got} == set(uids)
    fake.reset()
    assert client.get(V1 + "getContentsByName", params={"name": "my-cart"}).content == b""


# --- faults -----------------------------------------------------------------------------


def test_fail_next(client: httpx.Client, fake: FakeNBIA) -> None:
    fake.fail_next(2)
    for _ in range(2):
        r = client.get(V4 + "getCollectionValues")
        assert r.status_code == 500 and r.text.startswith(SERVER_ERROR + "\n")
        assert r.headers["content-type"] == "text/plain"
    assert client.get(V4 + "getCollectionValues").status_code == 200

    fake.fail_next(1, status=503, retry_after=7, path_contains="getSeries")
    assert client.get(V4 + "getCollectionValues").status_code == 200
    r = client.get(V4 + "getSeries", params={"Collection": "4D-Lung"})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    fake.fail_next(1, status=429, retry_after=2)
    assert login(client)["access_token"]  # the token endpoint is exempt by default
    r = client.get(V4 + "getCollectionValues")
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    fake.fail_next(1, status=503, include_token=True)
    assert (
        client.post(TOKEN, data={"grant_type": "password", "username": "nbia_guest"}).status_code
        == 503
    )
    assert len(fake.requests_to("getCollectionValues")) == 5  # faulted requests are logged


def test_drop_connection(client: httpx.Client, fake: FakeNBIA, nbia_upstream: FakeServer) -> None:
    fake.drop_connection_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(V4 + "getCollectionValues")
    assert client.get(V4 + "getCollectionValues").status_code == 200
    assert len(fake.requests) == 2


def test_cut_stream_abort(nbia_upstream: FakeServer, fake: FakeNBIA) -> None:
    uid = fake.big_series_uid
    fake.cut_stream(100_000, mode="abort", times=1)
    with httpx.Client(base_url=nbia_upstream.url) as c:
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError):
            with c.stream("GET", V4 + "getImage", params={"SeriesInstanceUID": uid}) as r:
                assert r.status_code == 200
                for chunk in r.iter_raw():
                    received += chunk
        assert len(received) == 100_000
        full = c.get(V4 + "getImage", params={"SeriesInstanceUID": uid})  # times=1: healed
        assert full.content[:100_000] == bytes(received)
        assert len(_zip(full).namelist()) == len(fake.images.instances(uid)) + 1
        # JSON answers are never cut
        fake.cut_stream(10)
        assert c.get(V4 + "getCollectionValues").status_code == 200


def test_cut_stream_clean(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "CT")
    fake.cut_stream(3000, mode="clean")
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid})
    assert r.status_code == 200 and len(r.content) == 3000
    with pytest.raises(zipfile.BadZipFile):
        _zip(r)


def _checked(client: httpx.Client, uid: str, body: bytes, md5s: Md5Policy) -> Verdict:
    """The series cache's check of ``body``, with the series' getSeriesSize numbers."""
    size = client.get(V4 + "getSeriesSize", params={"SeriesInstanceUID": uid}).json()[0]
    check = ZipCheck(md5s=md5s)
    for i in range(0, len(body), 65_536):
        check.feed(body[i : i + 65_536])
    check.expect(size["ObjectCount"], size["TotalSizeInBytes"])
    return check.finish()


@pytest.mark.parametrize("big", [False, True])
def test_zip_closed_after_n_images(client: httpx.Client, fake: FakeNBIA, big: bool) -> None:
    uid = fake.big_series_uid if big else series_of(fake, "CT")
    count = len(fake.images.instances(uid))
    assert count >= 3
    fake.close_zip_after(2, times=2, path_contains="getImageWithMD5Hash")
    plain = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid})  # not matched
    assert _checked(client, uid, plain.content, "optional").ok
    for _ in range(2):
        r = client.get(V4 + "getImageWithMD5Hash", params={"SeriesInstanceUID": uid})
        assert r.status_code == 200
        zf = _zip(r)  # what NBIA sends: a zip that opens and reads clean
        assert zf.testzip() is None
        assert zf.namelist() == ["00000001.dcm", "00000002.dcm"]  # and no md5hashes.csv
        verdict = _checked(client, uid, r.content, "required")
        assert (verdict.ok, verdict.reason, verdict.level) == (False, "count_mismatch", "full")
        # without NBIA's numbers, the missing list still gives it away
        check = ZipCheck(md5s="required")
        check.feed(r.content)
        assert check.finish().reason == "md5_list_missing"
    r = client.get(V4 + "getImageWithMD5Hash", params={"SeriesInstanceUID": uid})  # healed
    assert len(_zip(r).namelist()) == count + 1
    assert _checked(client, uid, r.content, "required").ok
    fake.close_zip_after(0, times=1)
    zf = _zip(client.get(V4 + "getImage", params={"SeriesInstanceUID": uid}))
    assert zf.namelist() == ["LICENSE"]  # written before the loop
    with pytest.raises(ValueError):
        fake.close_zip_after(-1)


def test_zip_with_altered_image(client: httpx.Client, fake: FakeNBIA) -> None:
    uid = series_of(fake, "CT")
    fake.alter_image(2, times=1)
    r = client.get(V4 + "getImageWithMD5Hash", params={"SeriesInstanceUID": uid})
    zf = _zip(r)
    assert zf.testzip() is None  # the CRC-32s are those of the bytes sent
    rows = dict(line.split(",") for line in zf.read("md5hashes.csv").decode().splitlines()[1:])
    assert len(rows) == len(zf.namelist()) - 1
    wrong = [n for n, md5 in rows.items() if hashlib.md5(zf.read(n)).hexdigest() != md5]
    assert wrong == ["00000002.dcm"]
    sop = fake.images.instances(uid)[1].sop_uid
    nbia_md5 = client.get(V4 + "getMD5HashForImage", params={"SOPInstanceUID": sop}).text
    assert rows["00000002.dcm"] == nbia_md5  # the database's value, not the bytes'
    altered = zf.read("00000002.dcm")
    assert len(altered) == fake.images.instances(uid)[1].size  # getSeriesSize still agrees
    assert pydicom.dcmread(io.BytesIO(altered)).SOPInstanceUID == sop
    verdict = _checked(client, uid, r.content, "required")
    assert (verdict.ok, verdict.reason) == (False, "md5_mismatch") and "00000002.dcm" in (
        verdict.message
    )
    again = client.get(V4 + "getImageWithMD5Hash", params={"SeriesInstanceUID": uid})
    assert _checked(client, uid, again.content, "required").ok  # times=1: healed
    with pytest.raises(ValueError):
        fake.alter_image(0)


def test_slow(client: httpx.Client, fake: FakeNBIA) -> None:
    fake.slow(seconds_before_headers=0.3)
    start = time.monotonic()
    assert client.get(V4 + "getCollectionValues").status_code == 200
    assert time.monotonic() - start >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        client.get(V4 + "getCollectionValues", timeout=0.05)
    start = time.monotonic()
    assert login(client)  # token endpoint exempt
    assert time.monotonic() - start < 0.3
    fake.slow(seconds_between_chunks=0.05)
    uid = max((s for s in fake.dataset.series if not s.big), key=lambda s: s.instances).uid
    start = time.monotonic()
    r = client.get(V4 + "getImage", params={"SeriesInstanceUID": uid})
    chunks = -(-len(r.content) // 4096)  # slow streams come in 4 KiB chunks
    assert chunks >= 3 and time.monotonic() - start >= 0.05 * (chunks - 1)
    assert len(_zip(r).namelist()) == 6
    fake.slow()  # all zeros: off
    start = time.monotonic()
    assert client.get(V4 + "getImage", params={"SeriesInstanceUID": uid}).status_code == 200
    assert time.monotonic() - start < 0.1


def test_stop_and_start_keep_the_port(nbia_upstream: FakeServer) -> None:
    url = nbia_upstream.url
    nbia_upstream.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + V4 + "getCollectionValues")
    nbia_upstream.start()
    assert nbia_upstream.url == url
    assert httpx.get(url + V4 + "getCollectionValues").status_code == 200


def test_stop_cuts_an_idle_keepalive_connection(nbia_upstream: FakeServer) -> None:
    with httpx.Client(base_url=nbia_upstream.url) as c:
        assert c.get(V4 + "getCollectionValues").status_code == 200
        nbia_upstream.stop()
        with pytest.raises(httpx.TransportError):
            c.get(V4 + "getCollectionValues")
        nbia_upstream.start()
        assert c.get(V4 + "getCollectionValues").status_code == 200


def test_reset(client: httpx.Client, fake: FakeNBIA) -> None:
    login(client)
    fake.fail_next(5)
    fake.token_lifetime_seconds = 1
    fake.reset()
    assert fake.requests == [] and fake.password_grants == 0
    assert fake.issued_access_tokens == set() and fake.token_lifetime_seconds == 7200
    assert client.get(V4 + "getCollectionValues").status_code == 200


def test_concurrent_downloads(nbia_upstream: FakeServer, fake: FakeNBIA) -> None:
    uids = [s.uid for s in fake.dataset.series]

    def fetch(uid: str) -> int:
        r = httpx.get(
            nbia_upstream.url + V4 + "getImage", params={"SeriesInstanceUID": uid}, timeout=30
        )
        return len(_zip(r).namelist())

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        counts = list(pool.map(fetch, uids * 2))
    assert counts == [len(fake.images.instances(u)) + 1 for u in uids * 2]


def test_big_zip_size(nbia_upstream: FakeServer, fake: FakeNBIA) -> None:
    uid = fake.big_series_uid
    try:
        fake.set_big_zip_bytes(2 * 1024 * 1024)
        r = httpx.get(nbia_upstream.url + V4 + "getImage", params={"SeriesInstanceUID": uid})
        assert abs(len(r.content) - 2 * 1024 * 1024) < 600_000
        size = httpx.get(
            nbia_upstream.url + V4 + "getSeriesSize", params={"SeriesInstanceUID": uid}
        ).json()[0]
        assert size["ObjectCount"] == len(_zip(r).namelist()) - 1
    finally:
        fake.set_big_zip_bytes(4 * 1024 * 1024)


def test_nlst_instance(nlst_upstream: FakeServer, nbia_upstream: FakeServer) -> None:
    assert nlst_upstream.url != nbia_upstream.url
    with httpx.Client(base_url=nlst_upstream.url) as c:
        assert c.get(V4 + "getCollectionValues").json() == [{"Collection": "NLST"}]
        r = c.post(V4 + "getManifestText", data={"list": "1.2", "includeAnnotation": "false"})
        assert "https://nlst.cancerimagingarchive.net/nbia-download" in r.text
        uid = nlst_upstream.app.big_series_uid
        assert uid != nbia_upstream.app.big_series_uid
        assert c.get(V4 + "getImage", params={"SeriesInstanceUID": uid}).status_code == 200


def test_cli_prints_url_and_uid() -> None:
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_nbia", "--port", str(port), "--big-zip-mb", "1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        uid = proc.stdout.readline().strip()
        assert url == f"url=http://127.0.0.1:{port}" and uid.startswith("big_series_uid=")
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(
                    url[4:] + V4 + "getSeriesSize",
                    params={"SeriesInstanceUID": uid.split("=", 1)[1]},
                )
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.json()[0]["ObjectCount"] == 2
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM: graceful, and the big zip is deleted


# --- tcia-utils 3.3.5 against the fake ---------------------------------------------------


@pytest.fixture
def tcia(nbia_upstream: FakeServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    from tcia_utils import nbia

    def set_api_url(endpoint: str, api_url: str = "nbia") -> str:
        version = "v1" if endpoint == "getContentsByName" else "v4"
        return f"{nbia_upstream.url}/nbia-api/services/{version}/"

    monkeypatch.setattr(nbia, "setApiUrl", set_api_url)
    return nbia


def test_tcia_utils_queries(tcia: Any, fake: FakeNBIA) -> None:
    assert tcia.getCollections() == [
        {"Collection": "4D-Lung"},
        {"Collection": "Soft-tissue-Sarcoma"},
        {"Collection": "TCGA-KIRC"},
    ]
    series = tcia.getSeries(collection="TCGA-KIRC")
    assert {s["Modality"] for s in series} == {"CT", "MR", "SEG"}
    assert tcia.getSeries(collection="CPTAC-SAR") is None  # empty body -> None
    df = tcia.getSeriesList([s["SeriesInstanceUID"] for s in series])
    assert len(df) == 4 and "SeriesInstanceUID" in df.columns
    assert set(df["Collection"]) == {"TCGA-KIRC"}
    assert len(tcia.getSharedCart("nbia-49121659384603347")) == 2
    seg = series_of(fake, "SEG")
    ct = next(s.references for s in fake.dataset.series if s.uid == seg)
    assert tcia.getSegRefSeries(seg) == ct
    rt = series_of(fake, "RTSTRUCT")
    assert tcia.getSegRefSeries(rt) == next(
        s.references for s in fake.dataset.series if s.uid == rt
    )
    assert (
        tcia.getDoiMetadata("10.7937/K9/TCIA.2015.7GO2GSKS")[0]["collection"]
        == "Soft-tissue-Sarcoma"
    )
    assert tcia.getUpdatedSeries("2020/01/01") is not None


def test_tcia_utils_simple_search(tcia: Any, fake: FakeNBIA) -> None:
    body = tcia.getSimpleSearch(collections=["4D-Lung"], modalities=["CT"])
    assert body["totalPatients"] == 2
    uids = tcia.getSimpleSearch(collections=["TCGA-KIRC"], format="uids")
    assert set(uids) == {s.uid for s in fake.dataset.series if s.collection == "TCGA-KIRC"}
    # tcia-utils sends criteriaType0=Criteria.DateRange: the server ignores the date filter
    dated = tcia.getSimpleSearch(
        collections=["TCGA-KIRC"], fromDate="2030/01/01", toDate="2030/12/31"
    )
    assert dated["totalPatients"] == 2
    sent = fake.requests_to("getSimpleSearch")[-1].body.decode()
    assert "criteriaType0=Criteria.DateRange" in sent


def test_tcia_utils_download_series(tcia: Any, fake: FakeNBIA, tmp_path: Path) -> None:
    uids = [s.uid for s in fake.dataset.series if s.collection == "4D-Lung"]
    df = tcia.downloadSeries(uids, input_type="list", path=str(tmp_path), format="df")
    assert len(df) == len(uids)
    for uid in uids:
        files = sorted(p.name for p in (tmp_path / uid).iterdir())
        assert "LICENSE" in files
        dcms = [f for f in files if f.endswith(".dcm")]
        assert len(dcms) == len(fake.images.instances(uid))
        assert pydicom.dcmread(tmp_path / uid / dcms[0]).SeriesInstanceUID == uid
    hashed = tmp_path / "hashed"
    tcia.downloadSeries(uids[:1], input_type="list", path=str(hashed), hash="y")
    assert (hashed / uids[0] / "md5hashes.csv").exists()
    assert len(fake.requests_to("getImage")) == len(uids)
    assert "NewFileNames=Yes" in fake.requests_to("getImage")[0].query

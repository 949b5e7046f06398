"""Row builders: the columns each endpoint family returns, filled from the dataset."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from .dataset import Dataset, Patient, Series, Study
from .dicom import SOP_CLASSES
from .images import ImageStore

SERIES_V4 = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "ProtocolName",
    "SeriesDate",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "AnnotationsFlag",
    "Collection",
    "Site",
    "PatientID",
    "PatientSex",
    "PatientAge",
    "AdmittingDiagnosisDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ImageCount",
    "MaxSubmissionTimestamp",
    "LicenseName",
    "LicenseURI",
    "DataDescriptionURI",
    "FileSize",
    "ReleasedStatus",
    "DateReleased",
    "StudyDesc",
    "StudyDate",
    "ThirdPartyAnalysis",
    "Authorized",
)
SERIES_V1 = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "ProtocolName",
    "SeriesDate",
    "SeriesDescription",
    "BodyPartExamined",
    "SeriesNumber",
    "AnnotationsFlag",
    "Collection",
    "PatientID",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ImageCount",
    "TimeStamp",
    "LicenseName",
    "LicenseURI",
    "CollectionURI",
    "FileSize",
    "DateReleased",
    "StudyDesc",
    "StudyDate",
    "ThirdPartyAnalysis",
)
PATIENT_V4 = (
    "PatientId",
    "PatientName",
    "PatientSex",
    "EthnicGroup",
    "Collection",
    "Phantom",
    "SpeciesCode",
    "SpeciesDescription",
    "Authorized",
)
PATIENT_V1 = (
    "PatientId",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "EthnicGroup",
    "Collection",
    "Phantom",
    "SpeciesCode",
    "SpeciesDescription",
)
STUDY_V4 = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "AdmittingDiagnosesDescription",
    "StudyID",
    "PatientAge",
    "PatientID",
    "PatientName",
    "PatientSex",
    "EthnicGroup",
    "Collection",
    "SeriesCount",
    "LongitudinalTemporalEventType",
    "LongitudinalTemporalOffsetFromEvent",
    "Authorized",
)
# v4/getSeriesMetadata: the catalog gives the count (40) and the first names only
METADATA_V4 = (
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientAge",
    "EthnicGroup",
    "SpeciesCode",
    "SpeciesDescription",
    "Phantom",
    "Collection",
    "Site",
    "StudyInstanceUID",
    "StudyDate",
    "StudyDescription",
    "StudyID",
    "AdmittingDiagnosesDescription",
    "LongitudinalTemporalEventType",
    "LongitudinalTemporalOffsetFromEvent",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDate",
    "SeriesDescription",
    "Modality",
    "ProtocolName",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "ImageCount",
    "FileSize",
    "AnnotationsFlag",
    "ThirdPartyAnalysis",
    "DataDescriptionURI",
    "LicenseName",
    "LicenseURI",
    "DateReleased",
    "MaxSubmissionTimestamp",
    "ReleasedStatus",
    "FrameOfReferenceUID",
    "SOPClassUID",
    "Authorized",
)
# root getSeriesMetadata2, the SEED sample's 16 columns
METADATA2 = (
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series ID",
    "Series Description",
    "Number of images",
    "File Size (Bytes)",
    "Collection Name",
    "Modality",
    "Manufacturer",
    "3rd Party Analysis",
    "Data Description URI",
    "Series Number",
    "License Name",
    "License URL",
)
# v1/getSeriesMetaData: keys with spaces
METADATA_V1 = (
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "License Name",
    "License URL",
)
CONTENTS_BY_NAME = (
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Collection",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "ImageCount",
    "FileSize",
    "Date Released",
)


def v4_date(day: dt.date) -> str:
    """v4 formats dates with date_format(..., '%m-%d-%Y')."""
    return day.strftime("%m-%d-%Y")


def v1_date(day: dt.date) -> str:
    """v1/v2 print java.sql.Timestamp.toString()."""
    return day.strftime("%Y-%m-%d 00:00:00.0")


def parse_v4_date(value: str) -> dt.date:
    return dt.datetime.strptime(value, "%m-%d-%Y").date()


def same(value: str | None, wanted: str | None) -> bool:
    """SQL equality under MySQL's case-insensitive collation; None = no filter."""
    return wanted is None or (value or "").lower() == wanted.lower()


class Tables:
    def __init__(self, dataset: Dataset, images: ImageStore) -> None:
        self.data = dataset
        self.images = images

    def _context(self, s: Series) -> tuple[Patient, Study]:
        return self.data.patient(s.collection, s.patient_id), self.data.study(s.study_uid)

    def series_v4(self, s: Series) -> dict[str, object]:
        patient, study = self._context(s)
        collection = self.data.collection(s.collection)
        assert collection is not None
        size, count = self.images.series_size(s.uid)
        return {
            "SeriesInstanceUID": s.uid,
            "StudyInstanceUID": s.study_uid,
            "Modality": s.modality,
            "ProtocolName": s.protocol,
            "SeriesDate": v4_date(study.date),
            "SeriesDescription": s.description,
            "BodyPartExamined": s.body_part,
            "SeriesNumber": s.number,
            "AnnotationsFlag": None,
            "Collection": s.collection,
            "Site": collection.site,
            "PatientID": s.patient_id,
            "PatientSex": patient.sex,
            "PatientAge": study.patient_age,
            "AdmittingDiagnosisDescription": None,
            "Manufacturer": s.manufacturer,
            "ManufacturerModelName": s.model,
            "SoftwareVersions": s.software,
            "ImageCount": count,
            "MaxSubmissionTimestamp": v4_date(s.released),
            "LicenseName": collection.license[0],
            "LicenseURI": collection.license[1],
            "DataDescriptionURI": collection.doi,
            "FileSize": size,
            "ReleasedStatus": "Released",
            "DateReleased": v4_date(s.released),
            "StudyDesc": study.description,
            "StudyDate": v4_date(study.date),
            "ThirdPartyAnalysis": s.third_party,
            "Authorized": 1,
        }

    def series_v1(self, s: Series) -> dict[str, object]:
        row = self.series_v4(s)
        study = self.data.study(s.study_uid)
        row.update(
            SeriesDate=v1_date(study.date),
            StudyDate=v1_date(study.date),
            DateReleased=v1_date(s.released),
            TimeStamp=v1_date(s.released),
            CollectionURI=row["DataDescriptionURI"],
        )
        return row

    def patient_v4(self, p: Patient) -> dict[str, object]:
        return {
            "PatientId": p.patient_id,
            "PatientName": p.patient_id,
            "PatientSex": p.sex,
            "EthnicGroup": p.ethnic_group,
            "Collection": p.collection,
            "Phantom": p.phantom,
            "SpeciesCode": p.species[0],
            "SpeciesDescription": p.species[1],
            "Authorized": 1,
        }

    def study_v4(self, st: Study) -> dict[str, object]:
        p = self.data.patient(st.collection, st.patient_id)
        return {
            "StudyInstanceUID": st.uid,
            "StudyDate": v4_date(st.date),
            "StudyDescription": st.description,
            "AdmittingDiagnosesDescription": None,
            "StudyID": st.study_id,
            "PatientAge": st.patient_age,
            "PatientID": p.patient_id,
            "PatientName": p.patient_id,
            "PatientSex": p.sex,
            "EthnicGroup": p.ethnic_group,
            "Collection": st.collection,
            "SeriesCount": sum(1 for s in self.data.series if s.study_uid == st.uid),
            "LongitudinalTemporalEventType": st.event_type,
            "LongitudinalTemporalOffsetFromEvent": st.event_offset,
            "Authorized": 1,
        }

    def metadata_v4(self, s: Series) -> dict[str, object]:
        row = {**self.series_v4(s), **self.study_v4(self.data.study(s.study_uid))}
        patient = self.data.patient(s.collection, s.patient_id)
        row.update(
            PatientName=patient.patient_id,
            SpeciesCode=patient.species[0],
            SpeciesDescription=patient.species[1],
            Phantom=patient.phantom,
            FrameOfReferenceUID=None,
            SOPClassUID=SOP_CLASSES.get(s.modality),
        )
        return row

    def metadata2(self, s: Series) -> dict[str, object]:
        r = self.series_v4(s)
        study = self.data.study(s.study_uid)
        return {
            "Subject ID": s.patient_id,
            "Study UID": s.study_uid,
            "Study Description": study.description,
            "Study Date": study.date.isoformat(),
            "Series ID": s.uid,
            "Series Description": s.description,
            "Number of images": r["ImageCount"],
            "File Size (Bytes)": r["FileSize"],
            "Collection Name": s.collection,
            "Modality": s.modality,
            "Manufacturer": s.manufacturer,
            "3rd Party Analysis": "" if s.third_party == "NO" else s.third_party,
            "Data Description URI": r["DataDescriptionURI"],
            "Series Number": s.number,
            "License Name": r["LicenseName"],
            "License URL": r["LicenseURI"],
        }

    def metadata_v1(self, s: Series) -> dict[str, object]:
        r = self.metadata2(s)
        return {
            "Series UID": s.uid,
            "Collection": s.collection,
            "3rd Party Analysis": s.third_party,
            "Data Description URI": r["Data Description URI"],
            "Subject ID": s.patient_id,
            "Study UID": s.study_uid,
            "Study Description": r["Study Description"],
            "Study Date": v1_date(self.data.study(s.study_uid).date),
            "Series Description": s.description,
            "Manufacturer": s.manufacturer,
            "Modality": s.modality,
            "SOP Class UID": SOP_CLASSES.get(s.modality),
            "Number of Images": r["Number of images"],
            "File Size": r["File Size (Bytes)"],
            "License Name": r["License Name"],
            "License URL": r["License URL"],
        }

    def contents_by_name(self, s: Series) -> dict[str, object]:
        r = self.series_v4(s)
        row = {k: r.get(k) for k in CONTENTS_BY_NAME}
        row["Date Released"] = v1_date(s.released)
        return row

    # --- filtering ------------------------------------------------------

    def series_where(
        self,
        collection: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
        modality: str | None = None,
        body_part: str | None = None,
        manufacturer: str | None = None,
        model: str | None = None,
    ) -> list[Series]:
        return [
            s
            for s in self.data.series
            if same(s.collection, collection)
            and same(s.patient_id, patient_id)
            and same(s.study_uid, study_uid)
            and same(s.uid, series_uid)
            and same(s.modality, modality)
            and same(s.body_part, body_part)
            and same(s.manufacturer, manufacturer)
            and same(s.model, model)
        ]

    def series_in(self, uids: Iterable[str]) -> list[Series]:
        wanted = set(uids)
        return [s for s in self.data.series if s.uid in wanted]

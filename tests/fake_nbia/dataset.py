"""The fake archive's content: collections, patients, studies, series.

Everything is deterministic: UIDs are derived from a hash of a fixed key, so two
FakeNBIA instances (or two test runs) serve byte-identical data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.99"  # 29 chars; hashed suffix keeps UIDs <= 64 chars

HUMAN = ("337915000", "Homo sapiens")
CC_BY_3 = (
    "Creative Commons Attribution 3.0 Unported License",
    "https://creativecommons.org/licenses/by/3.0/",
)
CC_BY_4 = (
    "Creative Commons Attribution 4.0 International License",
    "https://creativecommons.org/licenses/by/4.0/",
)
CC_BY_NC_4 = (
    "Creative Commons Attribution-NonCommercial 4.0 International License",
    "https://creativecommons.org/licenses/by-nc/4.0/",
)


def make_uid(key: str) -> str:
    """A valid, deterministic DICOM UID for `key`."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:24]
    return f"{UID_ROOT}.{int(digest, 16)}"


@dataclass(frozen=True)
class Collection:
    name: str
    doi: str  # DataDescriptionURI
    license: tuple[str, str]
    description: str  # HTML, as the portal stores it
    site: str
    desc_id: int

    @property
    def commercial_restricted(self) -> bool:
        return "NonCommercial" in self.license[0]


@dataclass(frozen=True)
class Patient:
    patient_id: str
    collection: str
    sex: str
    pk: int
    species: tuple[str, str] = HUMAN
    ethnic_group: str | None = None
    phantom: str = "NO"


@dataclass(frozen=True)
class Study:
    uid: str
    patient_id: str
    collection: str
    date: dt.date
    description: str
    study_id: str
    patient_age: str
    pk: int
    event_type: str | None = None
    event_offset: int | None = None


@dataclass(frozen=True)
class Series:
    uid: str
    study_uid: str
    patient_id: str
    collection: str
    modality: str
    description: str
    body_part: str
    number: int
    manufacturer: str
    model: str
    software: str
    released: dt.date
    pk: int
    instances: int  # for the big series this is only the default; the image store decides
    protocol: str | None = None
    third_party: str = "NO"
    references: str | None = None  # SEG/RTSTRUCT: the referenced image series
    big: bool = False
    bulk: bool = False  # of the bulk collection: big images, zips made while they are sent


@dataclass
class Dataset:
    """All records of one fake server, with lookups."""

    name: str
    collections: list[Collection]
    patients: list[Patient]
    studies: list[Study]
    series: list[Series]
    shared_carts: dict[str, list[str]] = field(default_factory=dict)

    def collection(self, name: str) -> Collection | None:
        return next((c for c in self.collections if c.name == name), None)

    def patient(self, collection: str, patient_id: str) -> Patient:
        return next(
            p for p in self.patients if p.collection == collection and p.patient_id == patient_id
        )

    def study(self, uid: str) -> Study:
        return next(s for s in self.studies if s.uid == uid)

    def find_series(self, uid: str) -> Series | None:
        return next((s for s in self.series if s.uid == uid), None)

    @property
    def big_series_uid(self) -> str:
        return next(s.uid for s in self.series if s.big)


class _Builder:
    """Accumulates records with running primary keys (the 'pk' the portal sees)."""

    def __init__(self, name: str) -> None:
        self.data = Dataset(name, [], [], [], [])
        self.pk = 1_277_952  # NBIA pks are large integers

    def next_pk(self) -> int:
        self.pk += 65_536
        return self.pk

    def collection(self, name: str, doi: str, lic: tuple[str, str], blurb: str, site: str) -> None:
        html = f"<p>{blurb}</p>\n"
        self.data.collections.append(
            Collection(name, doi, lic, html, site, 700_000_000 + len(self.data.collections))
        )

    def patient(self, collection: str, pid: str, sex: str) -> None:
        self.data.patients.append(Patient(pid, collection, sex, self.next_pk()))

    def study(
        self,
        collection: str,
        pid: str,
        key: str,
        date: dt.date,
        desc: str,
        age: str,
        event: tuple[str, int] | None = None,
    ) -> str:
        uid = make_uid(f"{self.data.name}/study/{key}")
        self.data.studies.append(
            Study(
                uid,
                pid,
                collection,
                date,
                desc,
                key,
                age,
                self.next_pk(),
                event[0] if event else None,
                event[1] if event else None,
            )
        )
        return uid

    def series(
        self,
        study_uid: str,
        key: str,
        modality: str,
        desc: str,
        body: str,
        number: int,
        maker: tuple[str, str, str],
        released: dt.date,
        instances: int,
        **extra: object,
    ) -> str:
        study = self.data.study(study_uid)
        uid = make_uid(f"{self.data.name}/series/{key}")
        self.data.series.append(
            Series(
                uid,
                study_uid,
                study.patient_id,
                study.collection,
                modality,
                desc,
                body,
                number,
                maker[0],
                maker[1],
                maker[2],
                released,
                self.next_pk(),
                instances,
                **extra,
            )
        )  # type: ignore[arg-type]
        return uid


GE = ("GE MEDICAL SYSTEMS", "Signa HDxt", "15\\LX\\MR Software release:15.0_M4_0910.a")
SIEMENS = ("SIEMENS", "Avanto", "syngo MR B17")
SIEMENS_CT = ("SIEMENS", "Sensation 16", "syngo CT 2007S")
PHILIPS = ("Philips", "Brilliance Big Bore", "3.6.4")
GE_CT = ("GE MEDICAL SYSTEMS", "LightSpeed16", "LightSpeedverrel")
QIICR = ("QIICR", "dcmqi", "1.2.2")


def build_nbia() -> Dataset:
    """The main archive: three populated collections and one without series."""
    b = _Builder("nbia")
    b.collection(
        "Soft-tissue-Sarcoma",
        "https://doi.org/10.7937/K9/TCIA.2015.7GO2GSKS",
        CC_BY_3,
        "FDG-PET/CT and MR imaging of soft-tissue sarcomas of the extremities.",
        "McGill University",
    )
    b.collection(
        "4D-Lung",
        "https://doi.org/10.7937/K9/TCIA.2016.ELN8YGLE",
        CC_BY_3,
        "Respiration-correlated 4D CT of non-small cell lung cancer patients.",
        "Virginia Commonwealth University",
    )
    b.collection(
        "TCGA-KIRC",
        "https://doi.org/10.7937/K9/TCIA.2016.V6PBVTDR",
        CC_BY_NC_4,
        "Kidney renal clear cell carcinoma imaging linked to TCGA.",
        "TCGA",
    )
    b.collection(
        "CPTAC-SAR",
        "https://doi.org/10.7937/TCIA.2019.9BT23R95",
        CC_BY_3,
        "Sarcoma cohort; no series have been released yet.",
        "CPTAC",
    )

    b.patient("Soft-tissue-Sarcoma", "STS_001", "F")
    b.patient("Soft-tissue-Sarcoma", "STS_002", "M")
    sts1 = b.study(
        "Soft-tissue-Sarcoma", "STS_001", "sts1-mr", dt.date(2003, 12, 12), "MRI LT LEG +C", "063Y"
    )
    b.series(
        sts1,
        "sts1-t1",
        "MR",
        "2. AXIAL T1 BOTH LEGS - RESEARCH",
        "LEG",
        2,
        GE,
        dt.date(2015, 5, 28),
        3,
        protocol="T1 AX",
    )
    b.series(
        sts1, "sts1-stir", "MR", "STIR COR", "LEG", 5, GE, dt.date(2015, 5, 28), 2, protocol="STIR"
    )
    sts1ct = b.study(
        "Soft-tissue-Sarcoma", "STS_001", "sts1-ct", dt.date(2004, 1, 5), "CT CHEST", "063Y"
    )
    b.series(sts1ct, "sts1-ct", "CT", "CHEST 5MM", "CHEST", 3, SIEMENS_CT, dt.date(2015, 5, 28), 3)
    sts2 = b.study(
        "Soft-tissue-Sarcoma", "STS_002", "sts2-mr", dt.date(2005, 3, 2), "MRI RT THIGH", "045Y"
    )
    b.series(sts2, "sts2-t2", "MR", "AX T2 FS", "THIGH", 4, SIEMENS, dt.date(2015, 5, 28), 4)

    b.patient("4D-Lung", "100_HM10395", "M")
    b.patient("4D-Lung", "101_HM10395", "F")
    lung = b.study(
        "4D-Lung",
        "100_HM10395",
        "lung100",
        dt.date(1997, 9, 16),
        "p4 lungs",
        "071Y",
        event=("Radiation Treatment", 0),
    )
    ct0 = b.series(
        lung,
        "lung100-ct0",
        "CT",
        "P4^P100^S300^I0, Gated, 0.0%",
        "LUNG",
        300,
        PHILIPS,
        dt.date(2016, 4, 5),
        5,
    )
    b.series(
        lung,
        "lung100-ct50",
        "CT",
        "P4^P100^S300^I0, Gated, 50.0%",
        "LUNG",
        305,
        PHILIPS,
        dt.date(2016, 4, 5),
        3,
    )
    b.series(
        lung,
        "lung100-rt",
        "RTSTRUCT",
        "ROI",
        "LUNG",
        1,
        PHILIPS,
        dt.date(2019, 2, 1),
        1,
        references=ct0,
    )
    b.series(
        lung,
        "lung100-big",
        "CT",
        "P4^P100^S300^I0, Gated, 20.0% (large)",
        "LUNG",
        320,
        PHILIPS,
        dt.date(2016, 4, 5),
        8,
        big=True,
    )
    lung101 = b.study(
        "4D-Lung",
        "101_HM10395",
        "lung101",
        dt.date(1998, 2, 3),
        "p4 lungs",
        "066Y",
        event=("Radiation Treatment", 14),
    )
    b.series(
        lung101,
        "lung101-ct",
        "CT",
        "P4^P101^S300^I0, Gated, 0.0%",
        "LUNG",
        300,
        PHILIPS,
        dt.date(2016, 4, 5),
        2,
    )

    b.patient("TCGA-KIRC", "TCGA-B0-4710", "M")
    b.patient("TCGA-KIRC", "TCGA-B0-5080", "F")
    kirc = b.study(
        "TCGA-KIRC",
        "TCGA-B0-4710",
        "kirc4710",
        dt.date(1993, 6, 22),
        "CT ABDOMEN W/WO CONTRAST",
        "058Y",
    )
    kct = b.series(
        kirc,
        "kirc4710-ct",
        "CT",
        "ARTERIAL PHASE 5MM",
        "ABDOMEN",
        2,
        GE_CT,
        dt.date(2014, 9, 16),
        3,
    )
    b.series(kirc, "kirc4710-mr", "MR", "AX T1 POST", "KIDNEY", 6, GE, dt.date(2014, 9, 16), 2)
    b.series(
        kirc,
        "kirc4710-seg",
        "SEG",
        "Kidney tumor segmentation",
        "ABDOMEN",
        1000,
        QIICR,
        dt.date(2020, 11, 4),
        1,
        references=kct,
        third_party="YES",
    )
    kirc2 = b.study(
        "TCGA-KIRC", "TCGA-B0-5080", "kirc5080", dt.date(1995, 1, 30), "MRI ABDOMEN", "049Y"
    )
    b.series(kirc2, "kirc5080-mr", "MR", "COR T2", "KIDNEY", 3, SIEMENS, dt.date(2021, 3, 1), 2)

    b.data.shared_carts["nbia-49121659384603347"] = [ct0, kct]
    return b.data


def build_nlst() -> Dataset:
    """The NLST server: one collection only."""
    b = _Builder("nlst")
    b.collection(
        "NLST",
        "https://doi.org/10.7937/TCIA.HMQ8-J677",
        CC_BY_4,
        "National Lung Screening Trial low-dose CT.",
        "NLST-LSS",
    )
    for pid, sex in (("100002", "M"), ("100004", "F")):
        b.patient("NLST", pid, sex)
    t0 = b.study(
        "NLST",
        "100002",
        "100002-T0",
        dt.date(1999, 1, 2),
        "NLST-LSS",
        "061Y",
        event=("Screening", 0),
    )
    b.series(
        t0,
        "100002-T0-a",
        "CT",
        "0,OPA,GE,HSQX,STANDARD,310,2.5,120,40,0.1,1.5",
        "CHEST",
        2,
        GE_CT,
        dt.date(2019, 6, 5),
        3,
    )
    b.series(
        t0,
        "100002-T0-b",
        "CT",
        "1,OPA,GE,HSQX,LUNG,310,2.5,120,40,0.1,1.5",
        "CHEST",
        3,
        GE_CT,
        dt.date(2019, 6, 5),
        3,
    )
    t1 = b.study(
        "NLST",
        "100002",
        "100002-T1",
        dt.date(2000, 1, 4),
        "NLST-LSS",
        "062Y",
        event=("Screening", 365),
    )
    b.series(
        t1,
        "100002-T1-a",
        "CT",
        "0,OPA,GE,HSQX,STANDARD,330,2.5,120,40,0.1,1.5",
        "CHEST",
        2,
        GE_CT,
        dt.date(2019, 6, 5),
        2,
    )
    t4 = b.study(
        "NLST",
        "100004",
        "100004-T0",
        dt.date(1999, 5, 10),
        "NLST-LSS",
        "057Y",
        event=("Screening", 0),
    )
    small = b.series(
        t4, "100004-T0-a", "CT", "B30f", "CHEST", 2, SIEMENS_CT, dt.date(2019, 6, 5), 4
    )
    b.series(
        t4,
        "100004-T0-big",
        "CT",
        "B50f (large)",
        "CHEST",
        3,
        SIEMENS_CT,
        dt.date(2019, 6, 5),
        8,
        big=True,
    )
    b.data.shared_carts["nbia-20190605000000001"] = [small]
    return b.data


BULK_COLLECTION = "Bulk-CT"
BULK_PATIENTS = 10


def add_bulk(data: Dataset, series: int, instances: int) -> None:
    """A collection of ``series`` CT series of ``instances`` big images each, over ten patients
    (one study each): for benchmarks that need gigabytes (see :class:`~.images.StreamedZip`)."""
    b = _Builder(data.name)
    b.data = data
    b.pk = max((s.pk for s in data.series), default=b.pk)
    b.collection(
        BULK_COLLECTION,
        "https://doi.org/10.0000/FAKE.BULK",
        CC_BY_4,
        "Generated CT series for benchmarks.",
        "Fake site",
    )
    studies = []
    for n in range(BULK_PATIENTS):
        pid = f"BULK-{n:03d}"
        b.patient(BULK_COLLECTION, pid, "F" if n % 2 else "M")
        studies.append(
            b.study(BULK_COLLECTION, pid, f"bulk{n}", dt.date(2020, 1, 1 + n), "CT CHEST", "060Y")
        )
    for n in range(series):
        b.series(
            studies[n % BULK_PATIENTS],
            f"bulk-{n}",
            "CT",
            f"BULK CHEST {n}",
            "CHEST",
            n + 1,
            SIEMENS_CT,
            dt.date(2021, 1, 1),
            instances,
            bulk=True,
        )


def build_dataset(name: str, bulk_series: int = 0, bulk_instances: int = 0) -> Dataset:
    """The dataset for a server name: 'nlst' gets NLST, anything else the main archive; with
    ``bulk_series``, also the bulk collection."""
    data = build_nlst() if name == "nlst" else build_nbia()
    if bulk_series:
        add_bulk(data, bulk_series, max(1, bulk_instances))
    return data

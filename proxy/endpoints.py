"""The endpoint table: every NBIA endpoint classified once, declaratively.

Each :class:`Endpoint` says what kind of payload it returns, whether calling it changes
something upstream, whether it needs the service token and whether its answer depends on
who asks. Routing, caching and upstream shielding all read this table; nothing else in the
gateway special-cases endpoint names. The source is ``shared/nbia-api.md`` §2.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Payload(Enum):
    """What an endpoint returns; binaries are streamed, the rest may be cached."""

    COUNT_JSON = "count-json"
    METADATA_JSON = "metadata-json"
    SEARCH_JSON = "search-json"
    CSV = "csv"
    TEXT = "text"  # MD5 hashes, yes/no flags, status lines
    MANIFEST = "manifest"
    BINARY_ZIP = "binary-zip"
    BINARY_DICOM = "binary-dicom"
    BINARY_JPEG = "binary-jpeg"
    WRITE = "write"  # side-effecting; answer is a short text or JSON
    AUTH = "auth"

    @property
    def is_binary(self) -> bool:
        return self in _BINARIES


_BINARIES = {Payload.BINARY_ZIP, Payload.BINARY_DICOM, Payload.BINARY_JPEG}


class TokenUse(Enum):
    """Whether an upstream call needs the service token."""

    NEVER = "never"  # v1: public, the server never reads Authorization
    OPTIONAL = "optional"  # v4: anonymous means the guest account; sent only when configured
    REQUIRED = "required"  # root "Advanced", v2 and v3: 401/500 without it


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One NBIA resource, identified by its path below ``/nbia-api/services/``."""

    path: str
    methods: frozenset[str]
    payload: Payload
    token: TokenUse
    side_effect: bool = False
    identity: bool = False  # the answer depends on the caller even when anonymous
    slow: bool = False  # may legitimately take longer than the read time-out (see _SLOW)

    @property
    def generation(self) -> str:
        head, _, _ = self.path.partition("/")
        return head if head in _VERSIONED else "root"

    @property
    def cacheable(self) -> bool:
        """True for read-only, non-binary endpoints (the metadata cache's domain)."""
        return not (self.side_effect or self.payload.is_binary or self.payload is Payload.AUTH)


_VERSIONED = {"v1", "v2", "v3", "v4"}
_GET = frozenset({"GET"})
_POST = frozenset({"POST"})
_ANY = frozenset({"GET", "POST"})

# Names by payload class, as catalogued. Generation prefixes are added below.
_V4_GET = {
    Payload.METADATA_JSON: (
        "getCollectionValues getModalityValues getBodyPartValues getManufacturerValues "
        "getPatient getPatientByCollectionAndModality NewPatientsInCollection getPatientStudy "
        "NewStudiesInPatientCollection getSeries getUpdatedSeries getSOPInstanceUIDs "
        "getDeniedSeries getSpeciesTax getCollectionDescriptions getDicomTags "
        "getDicomTagsByImageID getCollectionSite getManufacturerTree getMinMaxTimepoints "
        "getSeriesForDeletion"
    ),
    Payload.COUNT_JSON: (
        "getSeriesSize getCollectionValuesAndCounts getModalityValuesAndCounts "
        "getBodyPartValuesAndCounts getManufacturerValuesAndCounts getSpeciesValuesAndCounts"
    ),
    Payload.TEXT: "getMD5HashForImage",
    Payload.BINARY_ZIP: "getImage getImageWithMD5Hash getDCMImage getImageOther",
    Payload.BINARY_DICOM: "getSingleImage",
}
_V4_POST = {
    Payload.CSV: "getSeriesMetadata getSeriesMetadataCombined",
    Payload.METADATA_JSON: "getSeriesQCInfo getCollectionOrSeriesForDOI getSitesForSeries",
    Payload.SEARCH_JSON: (
        "getSimpleSearch getStudyDrillDown getStudyDrillDownWithSeriesIds getImageDrillDown "
        "getCartData"
    ),
    Payload.MANIFEST: (
        "getManifestForSimpleSearch getManifestText getManifestFromPatientStudySeries "
        "getManifestForCollection"
    ),
    Payload.TEXT: "getRestrictionsForSimpleSearch getMD5Hierarchy",
    Payload.BINARY_JPEG: "getThumbnail",
}
_V1_GET = {
    Payload.METADATA_JSON: (
        "getCollectionValues getModalityValues getBodyPartValues getManufacturerValues "
        "getPatient getPatientByCollectionAndModality NewPatientsInCollection getPatientStudy "
        "NewStudiesInPatientCollection getSeries getUpdatedSeries getSOPInstanceUIDs "
        "getSeriesMetaData getContentsByName getDeniedSeries getKeycloakParams"
    ),
    Payload.COUNT_JSON: "getSeriesSize",
    Payload.TEXT: "getM5HashForImage getUserAgreementTxt status status/version status/database",
    Payload.BINARY_ZIP: "getImage getImageWithMD5Hash getDCMImage getImageOther",
    Payload.BINARY_DICOM: "getSingleImage getAllSOPClassDefinition wado",
}
_V1_POST = {Payload.BINARY_DICOM: "getWado"}
_V2_GET = {
    Payload.METADATA_JSON: (
        "getCollectionValues getModalityValues getBodyPartValues getManufacturerValues "
        "getPatient getPatientByCollectionAndModality NewPatientsInCollection getPatientStudy "
        "NewStudiesInPatientCollection getSeries getUpdatedSeries getSOPInstanceUIDs "
        "getSeriesMetaData getContentsByName"
    ),
    Payload.COUNT_JSON: "getSeriesSize",
    Payload.TEXT: "getM5HashForImage",
    Payload.BINARY_ZIP: "getImage getImageWithMD5Hash getDCMImage",
    Payload.BINARY_DICOM: "getSingleImage",
}
_V2_POST = {Payload.METADATA_JSON: "getSeriesQCInfo"}
_ROOT_GET = {
    Payload.COUNT_JSON: (
        "getCollectionValuesAndCounts getModalityValuesAndCounts getBodyPartValuesAndCounts "
        "getManufacturerValuesAndCounts getSpeciesValuesAndCounts"
    ),
    Payload.METADATA_JSON: (
        "getSpeciesTax getCollectionDescriptions getDicomTags getDicomTagsByImageID "
        "getAdvancedQCCriteria getRoles getLicenses getVisibilities getCollectionSite "
        "getMinMaxTimepoints getSeriesForDeletion getManufacturerTree"
    ),
    Payload.TEXT: "hostName up",
}
_ROOT_POST = {
    Payload.METADATA_JSON: (
        "getCollectionOrSeriesForDOI getSharedList getSite getSitesForSeries getQCSearch "
        "getQCSearchForDeletion getQCHistoryReport"
    ),
    Payload.SEARCH_JSON: (
        "getSimpleSearchWithModalityAndBodyPartPaged getTextSearch getTextSearchPaged "
        "getStudyDrillDownWithSeriesIds getStudyDrillDown getImageDrillDown getCartData "
        "getAdvancedQCSearch"
    ),
    Payload.MANIFEST: (
        "getManifestForSimpleSearch getManifestForTextSearch getManifestTextV2 "
        "getManifestFromPatientStudySeries getManifestForCollection"
    ),
    Payload.TEXT: ("getRestrictionsForSimpleSearch getRestrictionsForTextSearch getMD5Hierarchy"),
    Payload.CSV: "getSeriesMetadata2 getSeriesMetadata3",
    Payload.BINARY_JPEG: "getThumbnail",
    Payload.BINARY_DICOM: "getWado",
    Payload.WRITE: (
        "createSharedList deleteSharedList addClientAudit submitDICOM submitSite "
        "submitLicense deleteLicense submitCollectionDescription submitDOIForCollection "
        "submitOnlineDeletion submitQCVisibility submitQCVisibilityForDataAdmin "
        "submitDeleteVisibility submitSiteForSeries solrUpdate"
    ),
}
# v3 is user administration: every call is treated as side-effecting (two GETs really are).
_V3 = (
    "assignDataSetToPG assignGroupToPGWithRoles assignPEsToPG assignPEsToPGs "
    "assignUserToGroups assignUserToPGWithRoles createCollectionSite createProtecionGroup "
    "createUser createUserGroup deassignPEsFromPG deassignPGsFromPE deleteGroup "
    "deleteProtecionGroup modifyProtecionGroup modifyRolesOfGroupForPG modifyRolesOfUserForPG "
    "modifyUser modifyUserGroup removeGroupFromPG removeUserFromGroup removeUserFromPG "
    "deassignDataSetFromPG deassignUserFromPGWithRoles getAllGroupsForUser getAllGroupsWithPGs "
    "getAllPGsWithPEs getAllPGsWithRolesForUser getAllUsersWithRolesForPG "
    "getAssociatedPGsForPEs getAvailableGroupsForUser getAvailablePEsForPG "
    "getAvailablePGsForGroup getAvailablePGsForPE getAvailablePGsForUser getConfigParams "
    "getGroupList getIncludedPEsForPG getPEList getPEListWithPGs getProjSiteList "
    "getProtectionEleNameList getProtectionGrpList getProtectionGrpNameList getRoleList "
    "getUserList getUserListForPG getUserListForUserGroup getUserNameList"
)
# Answers that differ per caller even on the anonymous v4 path (catalog §3).
_PER_CALLER = {
    "getRoles",
    "getSharedList",
    "getDeniedSeries",
    "getSeriesForDeletion",
    "getSeriesQCInfo",
    "getQCSearch",
    "getQCSearchForDeletion",
    "getQCHistoryReport",
    "getAdvancedQCSearch",
    "getAdvancedQCCriteria",
}
# Answers that may take minutes on a healthy server (catalog §2): getSeriesSize is "extremely
# slow"; one call can span the whole archive (getSeries and getUpdatedSeries without filters,
# searches and their manifests, tcia-utils asking for size=1000000), a whole collection
# (getManifestForCollection, getMD5Hierarchy by Collection) or 10,000 series (getSeriesMetadata
# as tcia-utils chunks it). Their read time-outs are no evidence that the upstream is unwell.
_SLOW = {
    "getSeriesSize",
    "getSeries",
    "getUpdatedSeries",
    "getSimpleSearch",
    "getSimpleSearchWithModalityAndBodyPartPaged",
    "getTextSearch",
    "getTextSearchPaged",
    "getManifestForSimpleSearch",
    "getManifestForTextSearch",
    "getManifestForCollection",
    "getSeriesMetadata",
    "getSeriesMetadata2",
    "getSeriesMetadata3",
    "getSeriesMetadataCombined",
    "getMD5Hierarchy",
}
_TOKEN_BY_GENERATION = {
    "v1": TokenUse.NEVER,
    "v2": TokenUse.REQUIRED,
    "v3": TokenUse.REQUIRED,
    "v4": TokenUse.OPTIONAL,
    "root": TokenUse.REQUIRED,
}


def _build_table() -> dict[str, Endpoint]:
    table: dict[str, Endpoint] = {}
    groups: list[tuple[str, frozenset[str], dict[Payload, str]]] = [
        ("v4/", _GET, _V4_GET),
        ("v4/", _POST, _V4_POST),
        ("v1/", _GET, _V1_GET),
        ("v1/", _POST, _V1_POST),
        ("v2/", _GET, _V2_GET),
        ("v2/", _POST, _V2_POST),
        ("", _GET, _ROOT_GET),
        ("", _POST, _ROOT_POST),
        ("v3/", _ANY, {Payload.WRITE: _V3}),
    ]
    for prefix, methods, by_payload in groups:
        generation = prefix.rstrip("/") or "root"
        for payload, names in by_payload.items():
            for name in names.split():
                table[prefix + name] = Endpoint(
                    path=prefix + name,
                    methods=methods,
                    payload=payload,
                    token=_TOKEN_BY_GENERATION[generation],
                    side_effect=payload is Payload.WRITE,
                    # Token-bearing generations answer per user; v4/v1 only for a few names.
                    identity=generation in {"v2", "v3", "root"} or name in _PER_CALLER,
                    slow=name in _SLOW,
                )
    return table


ENDPOINTS: dict[str, Endpoint] = _build_table()

#: Paths the gateway answers itself (the client side of NBIA's token protocol).
TOKEN_PATHS = frozenset({"/nbia-api/oauth/token", "/nbia-api/services/oauth/token"})
LOGOUT_PATHS = frozenset({"/nbia-api/logout", "/nbia-api/services/logout"})

_SERVICES = "/nbia-api/services/"
_KEYCLOAK_ALIAS = "/nbia-api/"  # the deployed build also maps resources without /services


def lookup(path: str) -> Endpoint | None:
    """Return the endpoint for an ``/nbia-api/...`` path, or None when it is not catalogued."""
    return ENDPOINTS.get(_resource_part(path))


def token_use_for(path: str) -> TokenUse:
    """Token policy for a path, catalogued or not (unknown paths follow their generation)."""
    endpoint = lookup(path)
    if endpoint is not None:
        return endpoint.token
    rest = _resource_part(path)
    head = rest.partition("/")[0] if "/" in rest else "root"
    return _TOKEN_BY_GENERATION.get(head, TokenUse.REQUIRED)


def _resource_part(path: str) -> str:
    if path.startswith(_SERVICES):
        return path[len(_SERVICES) :]
    if path.startswith(_KEYCLOAK_ALIAS):
        return path[len(_KEYCLOAK_ALIAS) :]
    return ""

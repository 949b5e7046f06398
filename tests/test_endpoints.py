"""The endpoint table (proxy/endpoints.py) against the NBIA API catalog.

The catalogued endpoints are parsed out of the markdown tables of ``shared/nbia-api.md`` §2,
so a catalogued endpoint missing from the table (or classified differently) fails here. The
remaining tests use names quoted from the catalog's text and from the brief, and need no file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from proxy.endpoints import (
    ENDPOINTS,
    LOGOUT_PATHS,
    TOKEN_PATHS,
    Endpoint,
    Payload,
    TokenUse,
    lookup,
    token_use_for,
)
from tests.reference import CATALOG  # a copy of <workspace>/shared/nbia-api.md

SERVICES = "/nbia-api/services/"
ALIAS = "/nbia-api/"  # the Keycloak build maps every resource without /services (catalog §1.1)
BINARIES = {Payload.BINARY_ZIP, Payload.BINARY_DICOM, Payload.BINARY_JPEG}

# The catalog's "payload class" column, mapped to the table's Payload values.
KIND_TO_PAYLOADS: dict[str, set[Payload]] = {
    "metadata-json": {Payload.METADATA_JSON},
    "count-json": {Payload.COUNT_JSON},
    "search-json": {Payload.SEARCH_JSON},
    "csv": {Payload.CSV},
    "manifest-text": {Payload.MANIFEST},
    "md5-text": {Payload.TEXT},
    "md5-text (plain text flag)": {Payload.TEXT},
    "plain text": {Payload.TEXT},
    "health": {Payload.TEXT},
    "metadata (text)": {Payload.TEXT},  # octet-stream text: relayed as bytes, never as JSON
    "metadata (binary)": {Payload.TEXT} | BINARIES,
    "binary-zip": {Payload.BINARY_ZIP},
    "binary-dicom": {Payload.BINARY_DICOM},
    "binary-jpeg": {Payload.BINARY_JPEG},
    "binary-dicom / binary-jpeg": {Payload.BINARY_DICOM, Payload.BINARY_JPEG},
    "binary-dicom/jpeg": {Payload.BINARY_DICOM, Payload.BINARY_JPEG},
    "write/side-effect": {Payload.WRITE},
    # v3 is user administration; the catalog says "suggest not proxying at all", the brief
    # says every v3 call counts as side-effecting.
    "write/side-effect or metadata-json": {Payload.WRITE},
}
TOKEN_BY_GENERATION = {
    "v1": TokenUse.NEVER,  # public, never reads Authorization (§1.2)
    "v4": TokenUse.OPTIONAL,  # anonymous = guest (§1.2)
    "v2": TokenUse.REQUIRED,
    "root": TokenUse.REQUIRED,
    "v3": TokenUse.REQUIRED,
}


def catalogued(path: str) -> Endpoint:
    """The table's entry for ``path`` below /nbia-api/services/ (the test fails without one)."""
    endpoint = lookup(SERVICES + path)
    assert endpoint is not None, f"{path} is not in the table"
    return endpoint


@dataclass(frozen=True)
class Catalogued:
    """One endpoint as the catalog lists it."""

    path: str  # below /nbia-api/services/, e.g. "v4/getSeries" or "getSpeciesTax"
    generation: str
    methods: frozenset[str]
    kind: str  # the catalog's payload class


def _sections(text: str) -> dict[str, str]:
    """Split §2 into its subsections, keyed by number ("2.1" ...)."""
    parts = re.split(r"^### (2\.\d) ", text, flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _rows(section: str) -> list[list[str]]:
    """The data rows of the markdown tables in a section, as lists of cell texts."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or set(line) <= {"|", "-", " "}:
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells[0] == "path":
            continue
        rows.append(cells)
    return rows


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def parse_catalog(text: str) -> list[Catalogued]:
    """Every endpoint of catalog §2.1-§2.5 (v4, v1, v2, root, v3); auth paths excluded."""
    sections = _sections(text)
    found: list[Catalogued] = []
    kinds: dict[str, dict[str, str]] = {"v4": {}, "v1": {}}

    for cells in _rows(sections["2.1"]):  # path | methods | params | response | class | ...
        for path in _ticked(cells[0]):
            found.append(Catalogued(path, "v4", frozenset(cells[1].split("/")), cells[4]))
            kinds["v4"][path.removeprefix("v4/")] = cells[4]

    for cells in _rows(sections["2.2"]):  # path | params | response | class | ...
        methods = dict(re.findall(r"`([^`]+)` \((GET|POST)", cells[0]))
        for path in _ticked(cells[0]):
            method = methods.get(path, "GET")  # "All v1 list endpoints: GET"
            found.append(Catalogued(path, "v1", frozenset({method}), cells[3]))
            kinds["v1"][path.removeprefix("v1/")] = cells[3]

    # v2 is prose: "Same names/params/responses as v1 except where noted: `v2/...`, `...`".
    v2_text = sections["2.3"].split("TU2420 called")[0]
    for token in _ticked(v2_text):
        if not re.fullmatch(r"(v2/)?(get|New)[A-Za-z0-9]+", token):
            continue  # parameter names such as `Date`, `SOPInstanceUid`
        name = token.removeprefix("v2/")
        kind = kinds["v1"].get(name) or kinds["v4"][name]
        method = "POST" if name == "getSeriesQCInfo" else "GET"  # "All GET except ..."
        found.append(Catalogued("v2/" + name, "v2", frozenset({method}), kind))

    for cells in _rows(sections["2.4"]):  # path | methods | params | response | class | ...
        for path in _ticked(cells[0]):
            found.append(Catalogued(path, "root", frozenset(cells[1].split("/")), cells[4]))

    for cells in _rows(sections["2.5"]):  # the v3 row lists its names in the methods cell
        if not cells[0].startswith("`v3/"):
            continue  # /nbia-api/oauth/token and /nbia-api/logout are answered locally
        posts, _, gets = cells[1].partition("GET with side effects")
        for part, method in ((posts, "POST"), (gets, "GET")):
            for name in re.findall(r"\b[a-z]+[A-Z]\w*", part):
                found.append(Catalogued("v3/" + name, "v3", frozenset({method}), cells[4]))
    return found


def _catalogued() -> list[Catalogued]:
    return parse_catalog(CATALOG.read_text(encoding="utf-8"))


CATALOGUED = _catalogued()
_CATALOG_PARAMS = [pytest.param(c, id=c.path) for c in CATALOGUED]


def test_catalog_parser_finds_every_generation() -> None:
    """The parser reads all five generations, so the per-endpoint test below is not vacuous."""
    by_generation: dict[str, set[str]] = {}
    for entry in CATALOGUED:
        by_generation.setdefault(entry.generation, set()).add(entry.path)
    assert {"v4/getSeries", "v4/getCollectionSite", "v4/getMinMaxTimepoints"} <= by_generation["v4"]
    assert {"v1/wado", "v1/getWado", "v1/status/database"} <= by_generation["v1"]
    assert {"v2/getUpdatedSeries", "v2/getSeriesQCInfo"} <= by_generation["v2"]
    assert {"getSpeciesTax", "solrUpdate", "getCartData", "up"} <= by_generation["root"]
    assert {"v3/createUser", "v3/deassignDataSetFromPG", "v3/getUserNameList"} <= by_generation[
        "v3"
    ]
    assert "v2/Date" not in by_generation["v2"] and "v2/SOPInstanceUid" not in by_generation["v2"]
    assert all(kind in KIND_TO_PAYLOADS for kind in {c.kind for c in CATALOGUED}), {
        c.kind for c in CATALOGUED
    } - set(KIND_TO_PAYLOADS)


@pytest.mark.parametrize("entry", _CATALOG_PARAMS)
def test_catalogued_endpoint_is_classified_as_catalogued(entry: Catalogued) -> None:
    """Each catalogued endpoint is in the table with the catalog's payload class, methods,
    token policy and side-effect flag, and is found through /nbia-api/services/."""
    endpoint = ENDPOINTS.get(entry.path)
    assert endpoint is not None, f"{entry.path} is catalogued but missing from the table"
    assert lookup(SERVICES + entry.path) is endpoint
    assert endpoint.payload in KIND_TO_PAYLOADS[entry.kind], (endpoint.payload, entry.kind)
    assert entry.methods <= endpoint.methods
    assert endpoint.generation == entry.generation
    assert endpoint.token is TOKEN_BY_GENERATION[entry.generation]
    assert endpoint.side_effect == entry.kind.startswith("write/side-effect")


def test_table_holds_nothing_the_catalog_does_not_list() -> None:
    """No invented endpoints: every table entry is a catalogued path."""
    assert set(ENDPOINTS) - {c.path for c in CATALOGUED} == set()


# Catalog §3 "Never cache": side effects. Names quoted from §2.4 (admin writes) and §2.5.
SIDE_EFFECTS = [
    "createSharedList",
    "deleteSharedList",
    "addClientAudit",
    "submitDICOM",
    "submitSite",
    "submitLicense",
    "submitCollectionDescription",
    "submitDOIForCollection",
    "submitOnlineDeletion",
    "submitQCVisibility",
    "submitQCVisibilityForDataAdmin",
    "submitDeleteVisibility",
    "submitSiteForSeries",
    "deleteLicense",
    "solrUpdate",
    "v3/createUser",
    "v3/modifyUser",
    "v3/assignUserToGroups",
    "v3/deassignDataSetFromPG",  # GET with side effects
    "v3/deassignUserFromPGWithRoles",  # GET with side effects
    "v3/getUserList",  # all of v3 is admin: not cached either
    "v3/getConfigParams",
]


@pytest.mark.parametrize("path", SIDE_EFFECTS)
def test_side_effecting_endpoints_are_never_cacheable(path: str) -> None:
    """Writes, admin calls and all of v3 are flagged side-effecting and not cacheable."""
    endpoint = catalogued(path)
    assert endpoint.side_effect
    assert not endpoint.cacheable


def test_every_v3_endpoint_is_side_effecting() -> None:
    """No v3 entry slips through as cacheable."""
    v3 = [e for path, e in ENDPOINTS.items() if path.startswith("v3/")]
    assert len(v3) >= 40
    assert all(e.side_effect and not e.cacheable for e in v3)


# Image downloads (catalog §3 "Soft side effects") and WADO/thumbnails, in every generation.
BINARY_PATHS = [
    *(f"{g}/{n}" for g in ("v4", "v1") for n in ("getImage", "getImageOther")),
    *(
        f"{g}/{n}"
        for g in ("v4", "v1", "v2")
        for n in ("getImageWithMD5Hash", "getSingleImage", "getDCMImage")
    ),
    "v2/getImage",
    "v4/getThumbnail",
    "getThumbnail",
    "v1/wado",
    "v1/getWado",
    "getWado",
]


@pytest.mark.parametrize("path", BINARY_PATHS)
def test_binary_endpoints_are_binary(path: str) -> None:
    """Zips, DICOM and JPEG answers are binary (streamed) and outside the metadata cache."""
    endpoint = catalogued(path)
    assert endpoint.payload.is_binary
    assert not endpoint.cacheable


# Catalog §3: "POST does NOT mean write ... Cache them keyed on the normalized form body."
READ_ONLY_POSTS = [
    "getSimpleSearchWithModalityAndBodyPartPaged",
    "getManifestForSimpleSearch",
    "getSeriesMetadata2",
    "getStudyDrillDownWithSeriesIds",
    "getMD5Hierarchy",
    "getCollectionOrSeriesForDOI",
    "getTextSearch",
    "v4/getSimpleSearch",
    "v4/getSeriesMetadata",
    "v4/getManifestForSimpleSearch",
]


@pytest.mark.parametrize("path", READ_ONLY_POSTS)
def test_read_only_posts_are_cacheable(path: str) -> None:
    """Search, manifest, metadata and MD5 POSTs are read-only: cacheable, not side-effecting."""
    endpoint = catalogued(path)
    assert "POST" in endpoint.methods
    assert not endpoint.side_effect and not endpoint.payload.is_binary
    assert endpoint.cacheable


def test_payload_binary_flag_covers_exactly_the_binary_classes() -> None:
    """Only the three binary payload classes are binary."""
    assert {p for p in Payload if p.is_binary} == BINARIES


def _generation_of(path: str) -> str:
    head = path.split("/")[0]
    return head if head in {"v1", "v2", "v3", "v4"} else "root"


@pytest.mark.parametrize(
    ("generation", "expected"), sorted(TOKEN_BY_GENERATION.items()), ids=lambda v: str(v)
)
def test_token_policy_follows_the_generation(generation: str, expected: TokenUse) -> None:
    """v1 never, v4 optional, v2/v3/root required, for every table entry of that generation,
    both on the entry and through token_use_for()."""
    paths = [p for p in ENDPOINTS if _generation_of(p) == generation]
    assert paths, generation
    for path in paths:
        assert ENDPOINTS[path].token is expected, path
        assert token_use_for(SERVICES + path) is expected, path
        if generation != "root":
            assert token_use_for(ALIAS + path) is expected, path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("v4/getBrandNewThing", TokenUse.OPTIONAL),
        ("v1/getBrandNewThing", TokenUse.NEVER),
        ("v2/getBrandNewThing", TokenUse.REQUIRED),
        ("v3/getBrandNewThing", TokenUse.REQUIRED),
        ("getBrandNewThing", TokenUse.REQUIRED),
    ],
)
def test_unknown_endpoints_are_not_in_the_table_but_follow_their_generation(
    path: str, expected: TokenUse
) -> None:
    """lookup() returns None for uncatalogued names; token_use_for() still applies the
    generation's policy (through /services and, for versioned paths, the alias)."""
    assert lookup(SERVICES + path) is None
    assert token_use_for(SERVICES + path) is expected
    if "/" in path:
        assert lookup(ALIAS + path) is None
        assert token_use_for(ALIAS + path) is expected


def test_identity_dependent_generations() -> None:
    """v2, v3 and root answers depend on the caller (catalog §3); so every entry says so."""
    for path, endpoint in ENDPOINTS.items():
        if endpoint.generation in {"v2", "v3", "root"}:
            assert endpoint.identity, path


@pytest.mark.parametrize(
    ("path", "identity"),
    [
        # Anonymous v4 callers are all the guest: shared answers (catalog §3) ...
        ("v4/getCollectionValues", False),
        ("v4/getSeries", False),
        ("v4/getSeriesMetadata", False),
        ("v4/getSimpleSearch", False),
        ("v4/getManifestForSimpleSearch", False),
        ("v4/getDicomTags", False),
        # ... except the ones §3 names: userName parameter, admin and QC views.
        ("v4/getDeniedSeries", True),
        ("v4/getSeriesForDeletion", True),
        ("v4/getSeriesQCInfo", True),
        # v1 is identity-independent (public collections, guest only).
        ("v1/getCollectionValues", False),
        ("v1/getSeries", False),
        ("v1/getSeriesMetaData", False),
        ("v1/getContentsByName", False),
        # Root endpoints named in §3.
        ("getRoles", True),
        ("getSharedList", True),
        ("getSpeciesTax", True),
    ],
)
def test_identity_dependence(path: str, identity: bool) -> None:
    """Whether the answer depends on who asks, as catalog §3 lists it."""
    endpoint = catalogued(path)
    assert endpoint.identity is identity


@pytest.mark.parametrize(
    "path", ["v4/getSeries", "v4/getImage", "v1/getSeriesMetaData", "v2/getSeries", "v3/createUser"]
)
def test_lookup_through_the_keycloak_alias(path: str) -> None:
    """/nbia-api/<version>/... (no /services) finds the same entry as /nbia-api/services/..."""
    endpoint = catalogued(path)
    assert endpoint.path == path
    assert lookup(ALIAS + path) is endpoint


@pytest.mark.parametrize("path", ["getBodyPartValuesAndCounts", "createSharedList"])
def test_keycloak_alias_also_covers_root_endpoints(path: str) -> None:
    """Catalog §1.1: the Keycloak build maps Jersey at both /* and /services/*, so EVERY
    resource, root "Advanced" ones included, is reachable without /services."""
    endpoint = catalogued(path)
    assert lookup(ALIAS + path) is endpoint


def test_paths_are_case_sensitive() -> None:
    """JAX-RS paths are case-sensitive: v1/getSeriesMetaData and v4/getSeriesMetadata are
    different resources, and the other spellings do not exist (catalog §1.1)."""
    v1 = lookup(SERVICES + "v1/getSeriesMetaData")
    v4 = lookup(SERVICES + "v4/getSeriesMetadata")
    assert v1 is not None and v4 is not None and v1 is not v4
    assert v1.payload is Payload.METADATA_JSON  # JSON with spaced keys (§2.2)
    assert v4.payload is Payload.CSV and v4.methods == frozenset({"POST"})  # §2.1
    assert lookup(SERVICES + "v1/getSeriesMetadata") is None
    assert lookup(SERVICES + "v4/getSeriesMetaData") is None
    assert lookup(SERVICES + "v4/getseries") is None
    assert lookup(SERVICES + "V4/getSeries") is None
    assert lookup(SERVICES + "getspeciestax") is None


@pytest.mark.parametrize(
    "path",
    [
        "/nbia-api/services/",
        "/nbia-api/services/v4/",
        "/nbia-api/",
        "/healthz",
        "/nbia-api/oauth/token",
        "/nbia-api/services/oauth/token",
        "/nbia-api/logout",
        "/services/v4/getSeries",  # no /nbia-api
        "/nbia-api/services/v4/getSeries/extra",
    ],
)
def test_lookup_returns_none_off_the_table(path: str) -> None:
    """Paths that are not a catalogued resource are not classified."""
    assert lookup(path) is None


def test_token_and_logout_paths_are_the_documented_ones() -> None:
    """The gateway answers the documented token and logout paths itself (catalog §2.5)."""
    assert {"/nbia-api/oauth/token", "/nbia-api/services/oauth/token"} <= TOKEN_PATHS
    assert "/nbia-api/logout" in LOGOUT_PATHS
    assert not (TOKEN_PATHS & LOGOUT_PATHS)


def test_endpoint_paths_match_their_keys() -> None:
    """Each entry is filed under its own path, and the generation is the path's first part."""
    for path, endpoint in ENDPOINTS.items():
        assert isinstance(endpoint, Endpoint)
        assert endpoint.path == path
        assert endpoint.generation == _generation_of(path)

"""Pure cache decisions: what a request's key is, how long an answer lives, what may be stored.

No I/O here. The key holds what makes two requests mean the same thing: the upstream (its base
URL, so a cache filled from a mistaken URL is never served for the right one), whose view is
asked for (identity), the method, the resource, and the query and form parameters, each in a
canonical order and kept apart: NBIA reads a GET resource's parameters from the query only and a
POST resource's from the form only, so ``?a=1`` and a body ``a=1`` are different questions.
Parameters are sorted by name with a stable sort, so repeated fields such as ``list=`` keep their
values in the order given. Which requests a key describes exactly is :mod:`proxy.cache.shape`'s
question.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from proxy.endpoints import Endpoint, Payload

HOUR = 3600.0
DAY = 24 * HOUR

#: Default lifetimes, first match wins; resource paths look like ``v4/getSeries``.
DEFAULT_TTL_PATTERNS: tuple[tuple[str, float], ...] = (
    # "what changed since" lists move the most
    ("*NewPatientsInCollection", HOUR),
    ("*NewStudiesInPatientCollection", HOUR),
    ("*getUpdatedSeries", HOUR),
    # value lists and counts
    ("*ValuesAndCounts", 6 * HOUR),
    ("*Values", 6 * HOUR),
    ("*getSeriesSize", 6 * HOUR),
    # searches, manifests and restriction flags: minutes
    ("*Search*", 10 * 60.0),
    ("*getManifest*", 10 * 60.0),
    ("*getRestrictionsFor*", 10 * 60.0),
)
#: Fallback by payload class when no pattern matches: series and study metadata a day.
DEFAULT_TTL_BY_PAYLOAD: Mapping[Payload, float] = {
    Payload.COUNT_JSON: 6 * HOUR,
    Payload.METADATA_JSON: DAY,
    Payload.SEARCH_JSON: 10 * 60.0,
    Payload.CSV: DAY,
    Payload.TEXT: DAY,
    Payload.MANIFEST: 10 * 60.0,
}

#: Deterministic client errors may be remembered briefly; everything else but 200 never.
NEGATIVE_STATUSES = frozenset({400, 404})

# Parameters whose values name a collection or series, for purging by either.
_COLLECTION_PARAMS = frozenset({"collection", "collectionname"})
_SERIES_PARAMS = frozenset(
    {"seriesinstanceuid", "seriesuid", "seriesid", "list", "serieslist", "seriesuids"}
)
# ... and a study or patient, so the update feeds can purge what names a changed series' own.
_STUDY_PARAMS = frozenset({"studyinstanceuid"})
_PATIENT_PARAMS = frozenset({"patientid"})

# Simple-search criteria types whose value names a collection or series: read as that parameter.
_CRITERIA_PARAMS = {"CollectionCriteria": "collection", "SeriesCriteria": "seriesinstanceuid"}


@dataclass(frozen=True, slots=True)
class CacheKey:
    """A request's identity in the cache: the digest is the primary key, the rest is for humans."""

    digest: str
    upstream: str  # the upstream's short name (the base URL is in the digest)
    identity: str
    method: str
    endpoint: str
    params: str
    tags: frozenset[tuple[str, str]]


def pairs(raw: bytes) -> list[tuple[str, str]]:
    """Query or form parameters as decoded pairs, in the order given (bytes kept, see _quote)."""
    if not raw:
        return []
    text = raw.decode("utf-8", "surrogateescape")
    return parse_qsl(text, keep_blank_values=True, errors="surrogateescape")


def make_key(
    origin: str,
    upstream: str,
    identity: str,
    method: str,
    endpoint: Endpoint,
    query: Sequence[tuple[str, str]],
    form: Sequence[tuple[str, str]] = (),
) -> CacheKey:
    """The canonical key for a request to ``origin`` (the upstream's base URL) with these
    ``query`` and ``form`` parameters.

    ``params``, for people reading the table, is ``?query form``: the canonical query after a
    ``?`` and the canonical form after a space, each left out when empty. Neither part can hold
    a ``?`` or a space (both are percent-encoded), so the string is unambiguous.
    """
    parts = []
    if query:
        parts.append("?" + _canonical(query))
    if form:
        parts.append(_canonical(form))
    params = " ".join(parts)
    text = "\n".join((origin, upstream, identity, method, endpoint.path, params))
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    tags = _tags(sorted([*query, *form], key=lambda pair: pair[0]))
    return CacheKey(digest, upstream, identity, method, endpoint.path, params, tags)


def origin(scheme: str, netloc: str, path: str) -> str:
    """An upstream's base URL as it goes into keys: ``netloc`` is host and port (no
    credentials), the path loses its trailing slash."""
    return f"{scheme}://{netloc}{path.rstrip('/')}"


def _canonical(pairs: Sequence[tuple[str, str]]) -> str:
    ordered = sorted(pairs, key=lambda pair: pair[0])  # stable: repeated fields keep their order
    return "&".join(f"{_quote(k, '')}={_quote(v, ',')}" for k, v in ordered)


def ttl_for(endpoint: Endpoint, overrides: Iterable[tuple[str, float]] = ()) -> float:
    """Seconds an answer from ``endpoint`` stays fresh: user patterns, then defaults."""
    for pattern, seconds in (*overrides, *DEFAULT_TTL_PATTERNS):
        if fnmatch.fnmatchcase(endpoint.path, pattern):
            return seconds
    return DEFAULT_TTL_BY_PAYLOAD.get(endpoint.payload, HOUR)


def lifetime(status: int, ttl: float, negative_ttl: float) -> float | None:
    """How long an answer with ``status`` may be kept, or None when it must not be stored.

    A 200 (including NBIA's empty-body "no results") lives ``ttl``; a 400/404 ``negative_ttl``
    (0 disables); 401, 403, 429, 5xx and everything else are never stored.
    """
    if status == 200:
        return ttl
    if status in NEGATIVE_STATUSES and negative_ttl > 0:
        return negative_ttl
    return None


def wants_fresh(cache_control: bytes | None, pragma: bytes | None) -> bool:
    """The client asked not to be served a stored answer (``no-cache``, ``max-age=0``).

    The answer then comes from the upstream and replaces the stored one.
    """
    if cache_control is not None:
        for directive in cache_control.lower().replace(b" ", b"").split(b","):
            if directive in (b"no-cache", b"max-age=0"):
                return True
    return pragma is not None and pragma.strip().lower() == b"no-cache"


def glob_to_like(pattern: str) -> str:
    """Translate a ``*``/``?`` glob into a SQL LIKE pattern (with ``\\`` as the escape)."""
    out = []
    for char in pattern:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _quote(text: str, safe: str) -> str:
    # surrogateescape round-trips bytes that were not valid UTF-8 in the request.
    return quote(text, safe=safe, errors="surrogateescape")


def _tags(pairs: list[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    tags: set[tuple[str, str]] = set()
    # Simple search names its filters in numbered pairs: criteriaType0=CollectionCriteria
    # with value0=LIDC-IDRI (catalog §2.6).
    criteria = {
        name[len("criteriatype") :]: value
        for name, value in pairs
        if name.lower().startswith("criteriatype")
    }
    for name, value in pairs:
        lowered = name.lower()
        if lowered.startswith("value") and criteria:
            lowered = _CRITERIA_PARAMS.get(criteria.get(name[len("value") :], ""), "")
        if lowered in _COLLECTION_PARAMS and value:
            tags.add(("collection", value))
        elif lowered in _SERIES_PARAMS:
            tags.update(("series", uid.strip()) for uid in value.split(",") if uid.strip())
        elif lowered in _STUDY_PARAMS and value:
            tags.add(("study", value))
        elif lowered in _PATIENT_PARAMS and value:
            tags.add(("patient", value))
    return frozenset(tags)

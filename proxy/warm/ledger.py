"""What the cache keeps of a cohort, read straight from its database and ``binary_dir``
(blocking; works whether a gateway runs or not): for ``cache ls`` and ``warm --check``.

A series is ready for offline use when its metadata answer (getSeriesMetadata) is stored and
its zip, in each variant asked for, is kept: a row whose file is there with the size the row
says (the check :meth:`~proxy.binary.files.BinaryStore.lookup` makes before serving it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from proxy.binary.files import BinaryStore
from proxy.binary.tables import BinaryFile, BinaryTag
from proxy.cache.tables import CacheEntry, CacheTag
from proxy.control import cached_series_rows
from proxy.warm.plan import VARIANTS, Cohort, unique


@dataclass(frozen=True)
class KeptZip:
    """A kept zip of one series in one variant."""

    variant: str
    size: int
    sha256: str
    validation: str
    fetched_at: float


@dataclass(frozen=True)
class SeriesState:
    """What the cache holds of one series."""

    uid: str
    metadata: bool  # a getSeriesMetadata answer naming it is stored
    metadata_expires_at: float | None
    zips: tuple[KeptZip, ...]
    missing_variants: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.metadata and not self.missing_variants


def series_of_collection(engine: Engine, cohort: Cohort) -> list[str]:
    """The series of ``cohort.collection`` (with its modality and body part filters) as the
    cached getSeries answers list them."""
    wanted = {
        "Collection": cohort.collection,
        "Modality": cohort.modality,
        "BodyPartExamined": cohort.body_part,
    }
    found = []
    for row in cached_series_rows(engine):
        if all(
            value is None or str(row.get(name, "")).lower() == value.lower()
            for name, value in wanted.items()
        ) and isinstance(row.get("SeriesInstanceUID"), str):
            found.append(row["SeriesInstanceUID"])
    return unique(found)


def variant_of(endpoint: str, params: str) -> str | None:
    """Which :data:`~proxy.warm.plan.VARIANTS` a kept download's request was (``params`` is
    the canonical ``?query`` of :func:`proxy.cache.policy.make_key`)."""
    pairs = (pair.partition("=") for pair in params.lstrip("?").split("&") if pair)
    others = {name: value for name, _, value in pairs if name != "SeriesInstanceUID"}
    for variant, (name, extra) in VARIANTS.items():
        if endpoint.rpartition("/")[2] == name and others == dict(extra):
            return variant
    return None


def states(
    cache_engine: Engine | None,
    binaries: BinaryStore | None,
    series: Sequence[str],
    variants: Iterable[str],
) -> list[SeriesState]:
    """The state of each of ``series`` (in order), for the zip ``variants`` wanted."""
    wanted = tuple(variants)
    metadata = _metadata(cache_engine, series) if cache_engine is not None else {}
    kept = _kept(binaries, series) if binaries is not None else {}
    result = []
    for uid in series:
        zips = tuple(kept.get(uid, {}).values())
        have = {z.variant for z in zips}
        result.append(
            SeriesState(
                uid,
                uid in metadata,
                metadata.get(uid),
                zips,
                tuple(v for v in wanted if v not in have),
            )
        )
    return result


def _metadata(engine: Engine, series: Sequence[str]) -> dict[str, float]:
    """Series named by a stored getSeriesMetadata answer, with the latest expiry."""
    found: dict[str, float] = {}
    query = (
        select(CacheTag.value, CacheEntry.expires_at)
        .join(CacheEntry, CacheEntry.key == CacheTag.key)
        .where(
            CacheTag.kind == "series",
            CacheEntry.endpoint.like("%getSeriesMetadata"),
            CacheEntry.status == 200,
        )
    )
    wanted = set(series)
    with Session(engine) as session:
        for uid, expires_at in session.execute(query):
            if uid in wanted:
                found[uid] = max(expires_at, found.get(uid, expires_at))
    return found


def _kept(store: BinaryStore, series: Sequence[str]) -> dict[str, dict[str, KeptZip]]:
    """Kept zips per series and variant whose file is there (rows without one are dropped by
    the lookup, as a gateway would)."""
    query = (
        select(BinaryTag.value, BinaryFile.digest, BinaryFile.endpoint, BinaryFile.params)
        .join(BinaryFile, BinaryFile.digest == BinaryTag.digest)
        .where(BinaryTag.kind == "series")
    )
    wanted = set(series)
    with Session(store.engine) as session:
        rows = [row for row in session.execute(query) if row[0] in wanted]
    found: dict[str, dict[str, KeptZip]] = {}
    for uid, digest, endpoint, params in rows:
        variant = variant_of(endpoint, params)
        if variant is None:
            continue
        kept = store.lookup(digest)
        if kept is None:
            continue
        found.setdefault(uid, {})[variant] = KeptZip(
            variant, kept.size, kept.sha256, kept.validation, kept.fetched_at
        )
    return found

"""Pure feed policy: which days to ask about, when to ask next, and what a feed's rows purge.

No I/O here (:mod:`proxy.feeds.poller` does it). NBIA's feeds key on *release dates* at day
resolution (``date_released > fromDate``), so every window reaches back to the day before the
last successful poll and the same rows come back poll after poll: a row is only acted on when
its fingerprint (the whole row) differs from what the previous successful poll saw.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: The two getUpdatedSeries forms: v2 (token, ``dd/MM/yyyy``) and v4 (``MM-DD-YYYY``).
Form = Literal["v2", "v4"]

#: First pause after a failed poll, doubled per further failure up to the cap.
BACKOFF_FIRST_SECONDS = 30.0
#: The longest pause between attempts at a failing feed (or the poll interval, if shorter).
BACKOFF_CAP_SECONDS = 3600.0


def window_start(last_success: float | None, oldest_cached: float | None, now: float) -> dt.date:
    """The ``fromDate`` of a poll starting at ``now`` (wall-clock seconds, UTC days).

    The day before the last successful poll began (the feed compares release *days*, with
    ``>`` in some versions and ``>=`` in others); before any success, the day before the oldest
    answer the cache holds (nothing older can be stale), or before ``now`` with an empty cache.
    """
    anchor = last_success if last_success is not None else oldest_cached
    if anchor is None or anchor > now:
        anchor = now
    return dt.datetime.fromtimestamp(anchor, dt.UTC).date() - dt.timedelta(days=1)


def feed_date(day: dt.date, form: Form) -> str:
    """``day`` as the feed's ``fromDate`` wants it: ``dd/MM/yyyy`` on v2, ``MM-DD-YYYY`` on v4."""
    return day.strftime("%d/%m/%Y" if form == "v2" else "%m-%d-%Y")


def backoff_seconds(failures: int, interval: float) -> float:
    """The pause after ``failures`` failed polls in a row: 30 s, doubling, capped at the
    smaller of the interval and an hour."""
    if failures <= 0:
        return interval
    cap = min(interval, BACKOFF_CAP_SECONDS)
    return float(min(cap, BACKOFF_FIRST_SECONDS * 2 ** min(failures - 1, 30)))


def next_poll_at(
    last_success: float | None, last_attempt: float | None, failures: int, interval: float
) -> float:
    """When an upstream's feeds are due (wall clock), from the position every replica shares:
    an interval after the last success, or a back-off after the last failed attempt."""
    if failures > 0 and last_attempt is not None:
        return last_attempt + backoff_seconds(failures, interval)
    if last_success is None:
        return float("-inf")  # never polled: now
    return last_success + interval


@dataclass(frozen=True, slots=True)
class Plan:
    """What one poll's rows ask for."""

    #: Metadata answers of the upstream whose request named any of these go.
    tags: frozenset[tuple[str, str]]
    #: Series whose kept downloads go.
    series: frozenset[str]
    #: Everything this poll saw (item -> fingerprint), for the next poll to compare with.
    seen: dict[str, str]
    changed: int  # items new or different since the previous poll
    repeated: int  # items the previous poll saw just so (the overlap)


def purge_plan(
    updated_series: Iterable[Mapping[str, Any]],
    collection_news: Mapping[str, Iterable[Mapping[str, Any]]],
    seen: Mapping[str, str],
) -> Plan:
    """What the rows of a poll purge, given what the previous poll ``seen``.

    ``updated_series`` are getUpdatedSeries rows: each new one purges what names the series,
    its study, its patient or its collection, and its kept downloads. ``collection_news`` are,
    per collection the cache holds, the rows of NewPatientsInCollection and
    NewStudiesInPatientCollection: new ones purge what names the collection (its lists), and
    the patients and studies they name.
    """
    tags: set[tuple[str, str]] = set()
    series: set[str] = set()
    now_seen: dict[str, str] = {}
    changed = repeated = 0
    for row in updated_series:
        uid = _text(row.get("SeriesInstanceUID"))
        if uid is None:
            continue
        item, mark = f"series:{uid}", fingerprint([row])
        if now_seen.get(item) == mark:
            continue  # the same row twice in one answer
        now_seen[item] = mark
        if seen.get(item) == mark:
            repeated += 1
            continue
        changed += 1
        series.add(uid)
        tags.add(("series", uid))
        tags.update(_names(row))
    for collection, rows in collection_news.items():
        listed = list(rows)
        if not listed:
            continue
        item, mark = f"collection:{collection}", fingerprint(listed)
        now_seen[item] = mark
        if seen.get(item) == mark:
            repeated += 1
            continue
        changed += 1
        tags.add(("collection", collection))
        for row in listed:
            tags.update(kind_value for kind_value in _names(row) if kind_value[0] != "collection")
    return Plan(frozenset(tags), frozenset(series), now_seen, changed, repeated)


def fingerprint(rows: Iterable[Mapping[str, Any]]) -> str:
    """A short digest of rows, independent of their order and of key order."""
    texts = sorted(json.dumps(dict(row), sort_keys=True, default=str) for row in rows)
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:32]


def _names(row: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The study, patient and collection a feed row names, as cache tags."""
    found = set()
    for kind, columns in (
        ("study", ("StudyInstanceUID",)),
        ("patient", ("PatientID", "PatientId")),
        ("collection", ("Collection",)),
    ):
        for column in columns:
            value = _text(row.get(column))
            if value is not None:
                found.add((kind, value))
    return found


def _text(value: object) -> str | None:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value).strip()
        return text or None
    return None

"""The cache decision: what to do with a cacheable request, as a pure function of three states.

* the request: does the client ask for a fresh answer (``no-cache``), is the gateway offline,
  may this request speak for identical concurrent ones (``shared``: its key describes it
  exactly, :attr:`~proxy.cache.shape.Fit.EXACT`);
* the stored entry (:class:`Freshness`): absent, fresh, expired within the
  stale-while-revalidate window, expired within max-stale, or too old to stand in;
* the upstream: whether its circuit is open (the breaker would refuse a request now).

:func:`decide` returns a :class:`Decision`: the :class:`Action` and whether a stale copy may
stand in when the upstream then fails (stale-if-error). Nothing here does I/O or reads a clock:
:func:`freshness` takes the time as an argument, so every state is tested by a table
(``tests/test_decision.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Freshness(enum.Enum):
    """The state of the stored entry for a request's key."""

    ABSENT = "absent"
    FRESH = "fresh"
    #: Expired within the stale-while-revalidate window (a 200 only).
    REVALIDATE = "expired within stale-while-revalidate"
    #: Expired within max-stale (a 200 only): may stand in when the upstream fails.
    STALE = "expired within max-stale"
    #: Expired beyond both windows, or an expired error answer: only offline mode serves it.
    EXPIRED = "expired"


class Action(enum.Enum):
    """What the gateway does with the request."""

    SERVE = "serve"  # the stored answer, X-Cache: HIT
    SERVE_STALE = "serve stale"  # the stored answer, X-Cache: STALE
    SERVE_STALE_AND_REVALIDATE = "serve stale and revalidate"  # plus one background refresh
    FETCH = "fetch"  # ask the upstream for this request alone
    FETCH_COALESCED = "fetch and coalesce"  # one upstream request for all identical waiters
    REFUSE = "refuse"  # offline with nothing stored: 504


@dataclass(frozen=True, slots=True)
class Decision:
    """An action, and whether the stored entry may be served stale if the fetch fails."""

    action: Action
    stale_on_failure: bool = False


def freshness(
    *,
    status: int | None,
    expires_at: float,
    now: float,
    revalidate_seconds: float,
    max_stale_seconds: float,
) -> Freshness:
    """Classify a stored entry (``status`` None: there is none) at time ``now``."""
    if status is None:
        return Freshness.ABSENT
    past = now - expires_at
    if past < 0:
        return Freshness.FRESH
    # Only a successful answer may stand in for a newer one; an expired 404 is just expired.
    if status != 200:
        return Freshness.EXPIRED
    if past < revalidate_seconds:
        return Freshness.REVALIDATE
    if past <= max_stale_seconds:
        return Freshness.STALE
    return Freshness.EXPIRED


def decide(
    stored: Freshness,
    *,
    stored_ok: bool,
    wants_fresh: bool,
    offline: bool,
    shared: bool,
    circuit_open: bool,
) -> Decision:
    """What to do with a cacheable request.

    ``stored_ok``: the stored answer is a 200 (a fresh error answer, e.g. a negative-cached
    404, is served while fresh but never stands in for a failed refresh).
    """
    if stored is Freshness.FRESH and not wants_fresh:
        return Decision(Action.SERVE)
    if offline:
        # Offline, anything stored beats nothing, however old.
        return Decision(Action.REFUSE if stored is Freshness.ABSENT else Action.SERVE_STALE)
    stand_in = stored_ok and stored in (Freshness.FRESH, Freshness.REVALIDATE, Freshness.STALE)
    if circuit_open and stand_in:
        return Decision(Action.SERVE_STALE)  # asking would only be refused by the breaker
    if shared and not wants_fresh and stored_ok and stored is Freshness.REVALIDATE:
        return Decision(Action.SERVE_STALE_AND_REVALIDATE)
    fetch = Action.FETCH_COALESCED if shared else Action.FETCH
    return Decision(fetch, stale_on_failure=stand_in)

"""The cache decision, state by state, without sockets (see proxy.cache.decision)."""

from __future__ import annotations

import itertools

import pytest

from proxy.cache.decision import Action, Decision, Freshness, decide, freshness

A, F, R, S, E = (
    Freshness.ABSENT,
    Freshness.FRESH,
    Freshness.REVALIDATE,
    Freshness.STALE,
    Freshness.EXPIRED,
)
SWR, MAX_STALE = 60.0, 3600.0


@pytest.mark.parametrize(
    ("status", "past_expiry", "expected"),
    [
        (None, 0.0, A),
        (200, -10.0, F),
        (200, -0.001, F),
        (404, -10.0, F),  # a negative answer is served while fresh
        (200, 0.0, R),  # expired at exactly its expiry time
        (200, SWR - 0.001, R),
        (200, SWR, S),
        (200, MAX_STALE, S),
        (200, MAX_STALE + 0.001, E),
        (404, 1.0, E),  # an expired error never stands in
        (500, 1.0, E),
    ],
)
def test_freshness(status: int | None, past_expiry: float, expected: Freshness) -> None:
    now = 1_000_000.0
    got = freshness(
        status=status,
        expires_at=now - past_expiry,
        now=now,
        revalidate_seconds=SWR,
        max_stale_seconds=MAX_STALE,
    )
    assert got is expected


def test_freshness_without_stale_while_revalidate_goes_straight_to_stale() -> None:
    got = freshness(
        status=200, expires_at=99.0, now=100.0, revalidate_seconds=0.0, max_stale_seconds=10.0
    )
    assert got is Freshness.STALE


FETCH = Decision(Action.FETCH)
FETCH_OR_STALE = Decision(Action.FETCH, stale_on_failure=True)
SHARED = Decision(Action.FETCH_COALESCED)
SHARED_OR_STALE = Decision(Action.FETCH_COALESCED, stale_on_failure=True)
SERVE = Decision(Action.SERVE)
STALE = Decision(Action.SERVE_STALE)
REVALIDATE = Decision(Action.SERVE_STALE_AND_REVALIDATE)
REFUSE = Decision(Action.REFUSE)

# stored, stored_ok, wants_fresh, offline, shared, circuit_open -> decision
TABLE = [
    # Nothing stored: ask the upstream (for all identical waiters when shared).
    (A, False, False, False, True, False, SHARED),
    (A, False, False, False, False, False, FETCH),
    (A, False, True, False, True, False, SHARED),
    (A, False, False, False, True, True, SHARED),  # the breaker refuses it: 503
    (A, False, False, True, True, False, REFUSE),  # offline and nothing stored: 504
    (A, False, True, True, False, False, REFUSE),
    # Fresh: served, unless the client asks for a fresh answer.
    (F, True, False, False, True, False, SERVE),
    (F, True, False, False, False, True, SERVE),
    (F, True, False, True, False, False, SERVE),  # offline too
    (F, False, False, False, True, False, SERVE),  # a fresh negative answer
    (F, True, True, False, True, False, SHARED_OR_STALE),  # no-cache: refetch, copy on failure
    (F, True, True, False, False, False, FETCH_OR_STALE),
    (F, False, True, False, True, False, SHARED),  # a fresh 404 never stands in
    (F, True, True, True, False, False, STALE),  # no-cache offline: the copy, marked STALE
    (F, True, True, False, True, True, STALE),  # no-cache, circuit open: the copy
    # Expired within stale-while-revalidate.
    (R, True, False, False, True, False, REVALIDATE),
    (R, True, False, False, False, False, FETCH_OR_STALE),  # not shared: no background refresh
    (R, True, True, False, True, False, SHARED_OR_STALE),  # no-cache: wait for the answer
    (R, True, False, True, True, False, STALE),  # offline
    (R, True, False, False, True, True, STALE),  # circuit open: do not even try
    # Expired within max-stale: refetch, the copy stands in if the upstream fails.
    (S, True, False, False, True, False, SHARED_OR_STALE),
    (S, True, False, False, False, False, FETCH_OR_STALE),
    (S, True, True, False, True, False, SHARED_OR_STALE),
    (S, True, False, True, False, False, STALE),
    (S, True, False, False, True, True, STALE),
    # Too old (or an expired error): only offline mode serves it.
    (E, True, False, False, True, False, SHARED),
    (E, False, False, False, False, False, FETCH),
    (E, True, False, False, True, True, SHARED),  # the breaker refuses it: 503
    (E, False, False, True, True, False, STALE),
]


def decided(
    stored: Freshness, ok: bool, wants_fresh: bool, offline: bool, shared: bool, circuit_open: bool
) -> Decision:
    """:func:`decide` on the inputs in the order of a TABLE row."""
    return decide(
        stored,
        stored_ok=ok,
        wants_fresh=wants_fresh,
        offline=offline,
        shared=shared,
        circuit_open=circuit_open,
    )


@pytest.mark.parametrize(
    ("stored", "ok", "wants_fresh", "offline", "shared", "circuit_open", "expected"), TABLE
)
def test_decide(
    stored: Freshness,
    ok: bool,
    wants_fresh: bool,
    offline: bool,
    shared: bool,
    circuit_open: bool,
    expected: Decision,
) -> None:
    assert decided(stored, ok, wants_fresh, offline, shared, circuit_open) == expected


def test_every_combination_has_a_safe_answer() -> None:
    """Over all inputs: nothing stored is never served, offline never fetches, an entry that
    may not stand in is never served stale, and a refusal happens only offline."""
    flags = (False, True)
    for stored, ok, wants_fresh, offline, shared, circuit_open in itertools.product(
        Freshness, flags, flags, flags, flags, flags
    ):
        if stored is Freshness.ABSENT and ok:
            continue  # not a state: nothing stored has no status
        got = decided(stored, ok, wants_fresh, offline, shared, circuit_open)
        serves = got.action in (
            Action.SERVE,
            Action.SERVE_STALE,
            Action.SERVE_STALE_AND_REVALIDATE,
        )
        if stored is Freshness.ABSENT:
            assert not serves and not got.stale_on_failure
        if offline:
            assert got.action in (Action.SERVE, Action.SERVE_STALE, Action.REFUSE)
        else:
            assert got.action is not Action.REFUSE
            if serves and got.action is not Action.SERVE:
                assert ok and stored is not Freshness.EXPIRED
        if got.action is Action.SERVE:
            assert stored is Freshness.FRESH and not wants_fresh
        if got.action is Action.FETCH_COALESCED:
            assert shared
        if got.stale_on_failure:
            assert ok

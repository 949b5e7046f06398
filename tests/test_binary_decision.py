"""The series cache decision (proxy.binary.decision): a table, no sockets."""

from __future__ import annotations

import pytest

from proxy.binary.decision import Action, Stored, decide, go_on_alone

KEPT, FILLING, NOTHING = Stored.KEPT, Stored.FILLING, Stored.NOTHING


# Whole requests: (stored, method, fresh, offline, circuit, shared, expected).
WHOLE = [
    # a kept file is served, however it is asked for
    (KEPT, "GET", False, False, False, True, Action.SERVE),
    (KEPT, "POST", False, False, False, True, Action.SERVE),
    (KEPT, "HEAD", False, False, False, True, Action.SERVE),
    (KEPT, "GET", False, False, False, False, Action.SERVE),
    # no-cache asks the upstream again, unless it cannot answer
    (KEPT, "GET", True, False, False, True, Action.FILL),
    (KEPT, "GET", True, True, False, True, Action.SERVE),
    (KEPT, "GET", True, False, True, True, Action.SERVE),
    (KEPT, "GET", True, False, False, False, Action.RELAY),
    # outages: kept files are served, nothing else reaches the upstream
    (KEPT, "GET", False, True, False, True, Action.SERVE),
    (KEPT, "GET", False, False, True, True, Action.SERVE),
    (NOTHING, "GET", False, True, False, True, Action.REFUSE_OFFLINE),
    (NOTHING, "HEAD", False, True, False, True, Action.REFUSE_OFFLINE),
    (FILLING, "GET", False, True, False, True, Action.REFUSE_OFFLINE),
    (NOTHING, "GET", False, False, True, True, Action.REFUSE_CIRCUIT),
    (NOTHING, "GET", False, False, True, False, Action.REFUSE_CIRCUIT),
    # a fill in progress is joined, never fetched a second time
    (FILLING, "GET", False, False, False, True, Action.JOIN),
    (FILLING, "GET", True, False, False, True, Action.JOIN),
    (FILLING, "HEAD", False, False, False, True, Action.JOIN),
    (FILLING, "GET", False, False, True, True, Action.JOIN),
    # ... but only by a request its key describes exactly
    (FILLING, "GET", False, False, False, False, Action.RELAY),
    # nothing kept: a fill, except for HEAD and inexact keys
    (NOTHING, "GET", False, False, False, True, Action.FILL),
    (NOTHING, "POST", False, False, False, True, Action.FILL),
    (NOTHING, "GET", True, False, False, True, Action.FILL),
    (NOTHING, "HEAD", False, False, False, True, Action.RELAY),
    (NOTHING, "GET", False, False, False, False, Action.RELAY),
]

# Requests with a Range, always an exact GET: (stored, fresh, offline, circuit, expected).
RANGED = [
    # a Range never starts a download: relayed (the upstream sends what the client reads)
    (NOTHING, False, False, False, Action.RELAY),
    (KEPT, True, False, False, Action.RELAY),  # no-cache with a Range: not a refill either
    # ... and is answered from what is there
    (KEPT, False, False, False, Action.SERVE),
    (FILLING, False, False, False, Action.JOIN),
    (FILLING, True, False, False, Action.JOIN),
    (NOTHING, False, True, False, Action.REFUSE_OFFLINE),
    (NOTHING, False, False, True, Action.REFUSE_CIRCUIT),
]


@pytest.mark.parametrize(
    ("stored", "method", "fresh", "offline", "circuit", "shared", "ranged", "expected"),
    [(*row[:-1], False, row[-1]) for row in WHOLE]
    + [
        (stored, "GET", fresh, offline, circuit, True, True, expected)
        for stored, fresh, offline, circuit, expected in RANGED
    ],
)
def test_decide(
    stored: Stored,
    method: str,
    fresh: bool,
    offline: bool,
    circuit: bool,
    shared: bool,
    ranged: bool,
    expected: Action,
) -> None:
    got = decide(
        stored,
        method=method,
        wants_fresh=fresh,
        offline=offline,
        circuit_open=circuit,
        shared=shared,
        ranged=ranged,
    )
    assert got is expected


@pytest.mark.parametrize(
    ("background", "broken", "alone", "cap", "expected"),
    [
        (True, False, 0, 4, True),
        (True, False, 3, 4, True),
        (True, False, 4, 4, False),  # the cap: the fifth abandoned fill is cancelled
        (True, False, 0, 0, False),  # 0: every fill stops with its last client
        (True, True, 0, 4, False),  # a file that cannot be kept is not fetched for nobody
        (False, False, 0, 4, False),  # background completion off
    ],
)
def test_a_fill_goes_on_alone_only_within_the_cap(
    background: bool, broken: bool, alone: int, cap: int, expected: bool
) -> None:
    got = go_on_alone(background=background, file_broken=broken, alone=alone, max_alone=cap)
    assert got is expected

"""The series cache decision: what to do with a binary download, a pure function of three states.

* the request: its method (GET, POST or HEAD), whether it names a ``Range`` (or ``If-Range``),
  whether the client asks for a fresh copy (``no-cache``), whether the gateway is offline, and
  whether its key describes it exactly (:attr:`~proxy.cache.shape.Fit.EXACT`: only then may one
  upstream download answer identical requests);
* what is stored for its key (:class:`Stored`): a kept file, a fill in progress here, nothing;
* the upstream: whether its circuit is open (the breaker would refuse a request now).

Nothing here does I/O; every state is tested by a table (``tests/test_binary_decision.py``).
"""

from __future__ import annotations

import enum


class Stored(enum.Enum):
    """What the gateway has for the key."""

    KEPT = "kept"  # a published file
    FILLING = "filling"  # a download of this process is writing it now
    NOTHING = "nothing"


class Action(enum.Enum):
    """What the gateway does with the request."""

    SERVE = "serve"  # the kept file (Range, If-Range, HEAD as ranges.plan says), X-Cache: HIT
    JOIN = "join"  # read the fill in progress as it grows (no second upstream request)
    FILL = "fill"  # start a fill and read it like any joiner
    RELAY = "relay"  # forward and relay as it arrives, keep nothing
    REFUSE_OFFLINE = "refuse offline"  # offline and nothing kept: 504 at once
    REFUSE_CIRCUIT = "refuse circuit"  # circuit open and nothing kept: the breaker's 503


def decide(
    stored: Stored,
    *,
    method: str,
    wants_fresh: bool,
    offline: bool,
    circuit_open: bool,
    shared: bool,
) -> Action:
    """What to do with a binary download request for a key in state ``stored``.

    ``shared``: the key describes the request exactly, so its upstream answer may stand for
    every identical request (and be kept). A HEAD never starts a download: it is answered from
    a kept file, waits for a fill in progress, or is relayed as before.
    """
    if stored is Stored.KEPT and (not wants_fresh or offline or circuit_open):
        # A kept file passed its checks: it beats asking an upstream that cannot answer.
        return Action.SERVE
    if offline:
        return Action.REFUSE_OFFLINE
    if stored is Stored.FILLING and shared:
        return Action.JOIN  # already fresh from the upstream, whatever no-cache says
    if circuit_open:
        return Action.REFUSE_CIRCUIT
    if method == "HEAD" or not shared:
        return Action.RELAY
    return Action.FILL

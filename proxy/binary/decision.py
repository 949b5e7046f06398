"""The series cache decision: what to do with a binary download, a pure function of three states.

* the request: its method (GET, POST or HEAD), whether it names a ``Range``, whether the client
  asks for a fresh copy (``no-cache``), whether the gateway is offline, and
  whether its key describes it exactly (:attr:`~proxy.cache.shape.Fit.EXACT`: only then may one
  upstream download answer identical requests);
* what is stored for its key (:class:`Stored`): a kept file, a fill in progress here, nothing;
* the upstream: whether its circuit is open (the breaker would refuse a request now).

A second decision is what happens to a fill when its last reader leaves (:func:`go_on_alone`).

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
    ranged: bool = False,
) -> Action:
    """What to do with a binary download request for a key in state ``stored``.

    ``shared``: the key describes the request exactly, so its upstream answer may stand for
    every identical request (and be kept). ``ranged``: a GET with a ``Range`` header.

    Neither a HEAD nor a ``Range`` ever starts a download (nor does no-cache with them): each is
    answered from a kept file, from a fill in progress, or relayed as before. A client that sends
    a few bytes of request and reads a few bytes of answer (``bytes=0-0``, a HEAD) must not make
    the gateway fetch a whole series of many GB; relayed, the upstream sends no more than the
    client reads (the relay stops when the client goes). What a user who asks for a range expects
    is a range (a resume, a peek at a zip's end), not a cached copy: a resume after a dropped
    connection finds the fill the dropped download left going on, or its kept file.
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
    if method == "HEAD" or ranged or not shared:
        return Action.RELAY
    return Action.FILL


def go_on_alone(*, background: bool, file_broken: bool, alone: int, max_alone: int) -> bool:
    """Whether a fill whose last reader has just left goes on (True) or is cancelled, keeping
    nothing.

    ``alone``: the fills of this process already going on without any reader. A fill goes
    on only when background completion is on, its file can still be kept, and fewer than
    ``max_alone`` fills run alone: a client that starts cold downloads and hangs up at once
    makes the gateway download at most ``max_alone`` series nobody reads (per process).
    """
    return background and not file_broken and alone < max_alone

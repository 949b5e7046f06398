"""Whether the database answers, as the request path sees it: a cache, never a dependency.

A read or write that fails because the database cannot be reached (refused, timed out, the pool
exhausted, the file locked or unreadable: :func:`proxy.db.is_unreachable`) marks it
unreachable. Requests then go on without it (a miss is relayed, a write skipped), and for
``retry_seconds`` after each failure the request path does not try it at all, so an outage
costs a request nothing; after that one caller tries again. The outage is logged once when it
starts and once when it ends (not once per request); every failure and every skip is counted
by operation (``read``, ``write``, ``binary_lookup``, ``binary_commit``, ``accounts``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from proxy.db import DEFAULT_TIMEOUT_SECONDS, describe_failure

log = logging.getLogger("nbia_proxy.database")


class StoreHealth:
    """The database's state for one gateway process; safe to use from any thread."""

    def __init__(
        self,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retry_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The longest a request waits for the database before going on without it.
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        #: Why the database is unreachable (its driver's words, no secrets); None while it is ok.
        self.reason: str | None = None
        self.errors: dict[str, int] = {}  # failed attempts, by operation
        self.skipped: dict[str, int] = {}  # operations not tried while it was unreachable
        self.outages = 0
        self._since = 0.0
        self._retry_at = 0.0
        # A flapping database is not a flood of lines: an outage that starts within a minute
        # of the last one logged is counted, not logged (nor is its end).
        self._logged_at: float | None = None
        self._announced = False

    @property
    def state(self) -> str:
        """``ok`` or ``unreachable``."""
        return "ok" if self.reason is None else "unreachable"

    def skipping(self, operation: str) -> bool:
        """True (and counted) while ``operation`` should not try the database at all."""
        if self.reason is None:
            return False
        with self._lock:
            if self.reason is None:
                return False
            now = self._clock()
            if now >= self._retry_at:
                # This caller tries; the others keep skipping until it fails or succeeds.
                self._retry_at = now + self.retry_seconds
                return False
            self.skipped[operation] = self.skipped.get(operation, 0) + 1
            return True

    def failed(self, operation: str, exc: BaseException) -> None:
        """Record that ``operation`` could not reach the database (logged once per outage)."""
        reason = describe_failure(exc) if not isinstance(exc, TimeoutError) else ""
        if not reason:
            reason = f"no answer within {self.timeout_seconds:g} s (database_timeout_seconds)"
        with self._lock:
            self.errors[operation] = self.errors.get(operation, 0) + 1
            first = self.reason is None
            self.reason = reason
            now = self._clock()
            self._retry_at = now + self.retry_seconds
            announce = first and (self._logged_at is None or now - self._logged_at >= 60.0)
            if first:
                self.outages += 1
                self._since = now
                self._announced = announce
            if announce:
                self._logged_at = now
        if announce:
            log.warning(
                "the database is unreachable (%s, during a %s): relaying without it (misses "
                "forwarded, writes skipped) and trying again every %g s; logged once until it "
                "answers again",
                reason,
                operation,
                self.retry_seconds,
            )

    def succeeded(self) -> None:
        """Record that the database answered (logs the end of an outage)."""
        if self.reason is None:
            return
        with self._lock:
            if self.reason is None:
                return
            self.reason = None
            lasted = self._clock() - self._since
            announced, self._announced = self._announced, False
        if announced:
            log.info("the database answers again after %.1f s unreachable: caching resumes", lasted)

    def document(self) -> dict[str, object]:
        """The state for /healthz and the cache stats."""
        doc: dict[str, object] = {
            "state": self.state,
            "errors": dict(self.errors),
            "skipped": dict(self.skipped),
            "outages": self.outages,
        }
        if self.reason is not None:
            doc["reason"] = self.reason
        return doc

"""Injected faults: error statuses, dropped connections, cut streams, slowness, bad zips.

Every rule skips the token endpoint unless it was created with include_token=True,
so a test can break the data path while logins keep working.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

CutMode = Literal["abort", "clean"]
#: Series zips NBIA really sends with HTTP 200 (series-cache-anchors.md §B2):
#: ``closed_after``: the writer's loop failed after N images and ``finally`` closed the zip,
#: so it is well-formed, shorter, and has no md5hashes.csv (written after the loop);
#: ``altered_image``: image N on disk no longer has the MD5 the database (md5hashes.csv) lists.
ZipFaultKind = Literal["closed_after", "altered_image"]


@dataclass
class _Rule:
    remaining: int | None  # None: until reset
    path_contains: str | None
    include_token: bool

    def matches(self, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if is_token_path(path) and not self.include_token:
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass
class FailRule(_Rule):
    status: int = 500
    retry_after: float | str | None = None


@dataclass
class CutRule(_Rule):
    after_bytes: int = 0
    mode: CutMode = "abort"


@dataclass
class ZipFault(_Rule):
    kind: ZipFaultKind = "closed_after"
    images: int = 0  # closed_after: images written; altered_image: which image (1-based)


@dataclass
class SlowRule(_Rule):
    before_headers: float = 0.0
    between_chunks: float = 0.0


def is_token_path(path: str) -> bool:
    return path.endswith("/oauth/token")


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._fails: list[FailRule] = []
            self._drops: list[_Rule] = []
            self._cuts: list[CutRule] = []
            self._zip_faults: list[ZipFault] = []
            self._slow: SlowRule | None = None

    def fail_next(
        self,
        n: int,
        status: int,
        retry_after: float | str | None,
        path_contains: str | None,
        include_token: bool,
    ) -> None:
        with self._lock:
            self._fails.append(FailRule(n, path_contains, include_token, status, retry_after))

    def drop_next(self, n: int, path_contains: str | None, include_token: bool) -> None:
        with self._lock:
            self._drops.append(_Rule(n, path_contains, include_token))

    def cut(
        self, after_bytes: int, mode: CutMode, times: int | None, path_contains: str | None
    ) -> None:
        with self._lock:
            self._cuts.append(CutRule(times, path_contains, False, after_bytes, mode))

    def zip_fault(
        self, kind: ZipFaultKind, images: int, times: int | None, path_contains: str | None
    ) -> None:
        with self._lock:
            self._zip_faults.append(ZipFault(times, path_contains, False, kind, images))

    def set_slow(
        self,
        before_headers: float,
        between_chunks: float,
        path_contains: str | None,
        include_token: bool,
    ) -> None:
        with self._lock:
            active = before_headers > 0 or between_chunks > 0
            self._slow = (
                SlowRule(None, path_contains, include_token, before_headers, between_chunks)
                if active
                else None
            )

    def _take(self, rules: list[_Rule], path: str) -> _Rule | None:
        with self._lock:
            for rule in rules:
                if rule.matches(path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None

    def take_failure(self, path: str) -> FailRule | None:
        rule = self._take(self._fails, path)  # type: ignore[arg-type]
        return rule if isinstance(rule, FailRule) else None

    def take_drop(self, path: str) -> bool:
        return self._take(self._drops, path) is not None

    def take_cut(self, path: str) -> CutRule | None:
        rule = self._take(self._cuts, path)  # type: ignore[arg-type]
        return rule if isinstance(rule, CutRule) else None

    def take_zip_fault(self, path: str) -> ZipFault | None:
        rule = self._take(self._zip_faults, path)  # type: ignore[arg-type]
        return rule if isinstance(rule, ZipFault) else None

    def take_image_fault(self, path: str) -> ZipFault | None:
        """An ``altered_image`` rule for a single-image answer (a zip's other faults have no
        meaning for one image)."""
        with self._lock:
            altering = [f for f in self._zip_faults if f.kind == "altered_image"]
        rule = self._take(altering, path)  # type: ignore[arg-type]
        return rule if isinstance(rule, ZipFault) else None

    def slowness(self, path: str) -> SlowRule | None:
        slow = self._slow
        return slow if slow is not None and slow.matches(path) else None

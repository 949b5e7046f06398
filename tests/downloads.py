"""Helpers shared by the tests of binary downloads: their paths, waiting without a clock
bound, and this process's open descriptors (for leaks)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

SERVICES = "/nbia-api/services"


def zip_path(uid: str, endpoint: str = "v4/getImage") -> str:
    """The gateway path of a series zip download."""
    return f"{SERVICES}/{endpoint}?SeriesInstanceUID={uid}"


def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition`` holds (pytest-timeout ends a wait that never does)."""
    while not condition():
        threading.Event().wait(0.02)


def open_fds() -> set[str]:
    """This process's open descriptors (needs ``/proc``)."""
    return set(os.listdir("/proc/self/fd"))


def fd_targets(fds: Iterable[str] | None = None) -> list[str]:
    """What the descriptors (default: all open ones) name; a leaked one shows its file."""
    named = []
    for fd in sorted(open_fds() if fds is None else fds):
        try:
            named.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile (listdir's own descriptor)
    return named

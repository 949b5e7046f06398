"""The stop deadline: a served process whose shutdown sticks exits anyway, and says where.

A thread blocked in a database call, or a task deaf to its cancellation, would otherwise keep a
stopping gateway alive until its supervisor kills it (Docker after the stop period, systemd
after 90 s), with nothing in the log to say why: Python 3.11 waits for every executor thread at
exit, without a limit. So once the application's shutdown begins (after the grace for transfers
in flight), a process still alive ``shutdown_cleanup_seconds`` later logs each thread's and each
task's position and exits with status 1.

``nbia-proxy serve`` arms it in each process it serves (:func:`arm`, workers included); the
application's lifespan starts it as its shutdown begins (:func:`begin`). The tests' in-thread
gateways never arm it: their process is the test run's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("nbia_proxy.server")

#: Frames shown per thread or task: where it waits, and the two calls that led there.
FRAMES = 3
#: How long the report may take to be logged before the process ends without it (a stop may
#: be stuck in a log write itself: a full pipe on stderr).
REPORT_SECONDS = 2.0


class StopDeadline:
    """Exits the process ``seconds`` after :meth:`start` unless the process ended first."""

    def __init__(self, seconds: float, exit: Callable[[int], object] = os._exit) -> None:
        self.seconds = seconds
        self._exit = exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: threading.Timer | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start counting (once); ``loop``: the loop whose tasks to describe if it expires."""
        if self._timer is not None:
            return
        self._loop = loop
        # A daemon thread: a stop that ends in time is not held up by the wait itself.
        self._timer = threading.Timer(self.seconds, self.expire)
        self._timer.daemon = True
        self._timer.name = "nbia-proxy-stop-deadline"
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def expire(self) -> None:
        """Log where the stop is stuck (for at most :data:`REPORT_SECONDS`), then end the
        process (status 1) whatever the report did."""
        try:
            reporter = threading.Thread(target=self._report, name="nbia-proxy-stop-report")
            reporter.daemon = True
            reporter.start()
            reporter.join(REPORT_SECONDS)
        finally:
            self._exit(1)

    def _report(self) -> None:
        try:
            where = "\n".join(self.positions())
        except Exception as exc:  # noqa: BLE001 -- the exit must not depend on the report
            where = f"(the positions could not be read: {exc!r})"
        log.error(
            "the stop is stuck %.0f s after the shutdown began (shutdown_cleanup_seconds); "
            "exiting anyway. Still running:\n%s",
            self.seconds,
            where,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()

    def positions(self) -> list[str]:
        """One line per thread (but the deadline's own) and per unfinished task: where it is."""
        current = sys._current_frames()
        lines = []
        for thread in threading.enumerate():
            frame = current.get(thread.ident or -1)
            if thread.name.startswith("nbia-proxy-stop-") or frame is None:
                continue  # the deadline's own threads
            lines.append(f"thread {thread.name}: {_where(traceback.extract_stack(frame))}")
        for task in self._tasks():
            awaited = _awaited_frames(task.get_coro())
            stack = traceback.StackSummary.extract((f, f.f_lineno) for f in awaited)
            lines.append(f"task {task.get_name()}: {_where(stack)}")
        return lines

    def _tasks(self) -> list[asyncio.Task[object]]:
        if self._loop is None or self._loop.is_closed():
            return []
        # Read from another thread while the loop may run: a copy, and a retry if the set
        # changed under it; a description that fails is better left out than the exit missed.
        for _ in range(3):
            try:
                return [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            except RuntimeError:
                continue
        return []


def _awaited_frames(coroutine: object) -> list[FrameType]:
    """The frames of a suspended coroutine and of what it awaits, outermost first, down to
    where it waits (``Task.get_stack`` gives the outermost only)."""
    frames = []
    while coroutine is not None:
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "gi_yieldfrom", None)
    return frames


def _where(stack: traceback.StackSummary) -> str:
    shown = list(stack)[-FRAMES:]
    return " < ".join(
        f"{frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"
        for frame in reversed(shown)
    )


_armed: StopDeadline | None = None


def arm(seconds: float) -> None:
    """Give this process a stop deadline of ``seconds`` (0: none), started by :func:`begin`."""
    global _armed
    _armed = StopDeadline(seconds) if seconds > 0 else None


def begin() -> None:
    """The application's shutdown begins: start the deadline, if this process has one."""
    if _armed is None:
        return
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    _armed.start(loop)

"""The progress of a warm run, rendered from its state (pure: the caller writes the text).

On a terminal, one line redrawn in place (``\\r``): series done of total, bytes, rate, ETA. On a
pipe or in a log, one plain line per finished series, so nothing is overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

_UNITS = ("B", "KB", "MB", "GB", "TB")
BAR_WIDTH = 24


@dataclass
class State:
    """Counts of a run so far. ``expected_bytes`` is the sum of the series' announced sizes
    (getSeriesSize), 0 when unknown; ``fetched_bytes`` are the bytes that came from upstream."""

    total: int
    started: float
    ready: int = 0
    kept: int = 0  # ready because the cache already had them (no download)
    failed: int = 0
    expected_bytes: int = 0
    done_bytes: int = 0  # announced size of the series finished (ready, kept or failed)
    fetched_bytes: int = 0

    @property
    def finished(self) -> int:
        return self.ready + self.kept + self.failed


def human_bytes(size: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as disks and networks count)."""
    for unit in _UNITS:
        if abs(size) < 1000 or unit == _UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """75 -> '1m15s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def rate(state: State, now: float) -> float:
    """Bytes per second fetched from upstream so far."""
    elapsed = now - state.started
    return state.fetched_bytes / elapsed if elapsed > 0 else 0.0


def eta(state: State, now: float) -> float | None:
    """Seconds left at the current rate, None while it cannot be told."""
    speed = rate(state, now)
    left = state.expected_bytes - state.done_bytes
    if speed <= 0 or state.expected_bytes <= 0:
        return None
    return max(0.0, left) / speed


def bar_line(state: State, now: float, width: int = BAR_WIDTH) -> str:
    """The terminal line (no ``\\r``, no newline)."""
    share = state.finished / state.total if state.total else 1.0
    filled = int(share * width)
    bar = "#" * filled + "-" * (width - filled)
    left = eta(state, now)
    parts = [
        f"[{bar}] {state.finished}/{state.total} series",
        human_bytes(state.fetched_bytes),
        f"{human_bytes(rate(state, now))}/s",
        f"ETA {human_seconds(left)}" if left is not None else "ETA --",
    ]
    if state.failed:
        parts.append(f"{state.failed} failed")
    return "  ".join(parts)


def event_line(state: State, uid: str, outcome: str, detail: str = "") -> str:
    """A plain line for a finished series: ``[3/50] ready 1.2.3 (21.0 MB)``."""
    tail = f" ({detail})" if detail else ""
    return f"[{state.finished}/{state.total}] {outcome} {uid}{tail}"


def summary_lines(
    ready: int, kept: int, failed: dict[str, str], skipped: int, fetched: int, seconds: float
) -> list[str]:
    """The closing account: what is ready, what failed and why, what was not tried."""
    lines = [
        f"ready: {ready + kept} series ({kept} already kept, {ready} fetched, "
        f"{human_bytes(fetched)} in {human_seconds(seconds)})",
        f"failed: {len(failed)}",
    ]
    lines += [f"  {uid}: {reason}" for uid, reason in sorted(failed.items())]
    lines.append(
        f"skipped: {skipped} (not tried: the run was stopped)" if skipped else "skipped: 0"
    )
    return lines

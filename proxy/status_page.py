"""The status page: a :class:`~proxy.status.Snapshot` as one HTML document (pure).

Plain HTML with inline CSS and no script: it reloads itself with ``<meta http-equiv=refresh>``,
needs nothing from any other host, and works with JavaScript off. Every value is escaped:
series UIDs, user names, collection names and error messages come from clients and upstreams.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence

from proxy.status import CollectionFigures, Download, MinuteTally, Snapshot, UpstreamStatus

#: Sent with the page: no script, no frame, nothing from elsewhere, even if escaping failed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.5em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37} .bad{color:#b42318;font-weight:bold} .warn{color:#9a6700}
.alert{padding:.4em .8em;margin:.3em 0;border-radius:4px}
.critical{background:#fde8e7;border:1px solid #f1aeb5}
.warning{background:#fff4d6;border:1px solid #f0d58a}
.bar{display:inline-block;height:.8em;background:#6b9bd1;vertical-align:middle}
.muted{color:#777} code{font-size:.95em}
"""


def e(value: object) -> str:
    """``value`` as text safe in HTML content and in quoted attributes."""
    return html.escape(str(value), quote=True)


def size(count: int | float) -> str:
    """Bytes for people: ``1.5 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def when(at: float | None, now: float) -> str:
    """A Unix time as UTC and how long ago."""
    if at is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f"{stamp} ({max(0, int(now - at))} s ago)"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int]) -> str:
    """A table; cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _upstreams(upstreams: list[UpstreamStatus], now: float) -> str:
    rows = []
    for u in upstreams:
        state = f'<span class="{"ok" if u.state == "ok" else "bad"}">{e(u.state)}</span>'
        token = u.token
        expiry = "no token yet" if token.state == "none" else "-"
        if token.expires_at is not None and token.expires_in_seconds is not None:
            stamp = time.strftime("%H:%M:%S UTC", time.gmtime(token.expires_at))
            expiry = f"{e(stamp)} (in {int(token.expires_in_seconds)} s)"
        token_class = "bad" if token.state in ("failing", "expired") else "ok"
        token_cell = f'<span class="{token_class}">{e(token.state)}</span>'
        token_cell += f", {expiry}" if token.expires_at is None else f", expires {expiry}"
        if token.last_failure:
            token_cell += f"<br>last failure: {e(token.last_failure)}"
        error = "-"
        if u.last_error:
            error = f"{e(u.last_error)}<br><span class=muted>{e(when(u.last_error_at, now))}</span>"
        rows.append(
            [
                f"<b>{e(u.name)}</b><br><code>{e(u.url)}</code> at <code>{e(u.mount)}</code>",
                state,
                "yes" if u.reachable else '<span class="bad">no</span>',
                e(u.circuit),
                e(u.queued),
                token_cell,
                error,
            ]
        )
    headers = ("upstream", "state", "reachable", "circuit", "queued", "service token", "last error")
    return _table(headers, rows, {4})


def _minutes(minutes: list[MinuteTally]) -> str:
    peak = max((m.requests for m in minutes), default=0) or 1
    rows = []
    for m in reversed(minutes):
        label = time.strftime("%H:%M", time.gmtime(m.start)) + (" (so far)" if m.partial else "")
        ratio = f"{m.from_cache / m.requests:.0%}" if m.requests else "-"
        width = round(120 * m.requests / peak)
        rows.append(
            [
                e(label),
                e(m.requests),
                e(f"{m.requests / 60:.2f}"),
                e(m.from_cache),
                e(ratio),
                f'<span class="bar" style="width:{width}px"></span>',
            ]
        )
    headers = ("minute", "requests", "req/s", "from cache", "hit ratio", "")
    return _table(headers, rows, {1, 2, 3, 4})


def _collections(collections: list[CollectionFigures]) -> str:
    rows = [
        [
            e(c.name),
            e(c.entries),
            e(size(c.bytes)),
            e(c.files),
            e(size(c.file_bytes)),
            e(c.recently_used),
        ]
        for c in collections
    ]
    headers = ("collection", "answers", "answer bytes", "files", "file bytes", "used in the hour")
    return _table(headers, rows, {1, 2, 3, 4, 5})


def _downloads(downloads: list[Download]) -> str:
    rows = [
        [
            e(d.user) + ("" if d.kind == "client" else ' <span class="muted">(background)</span>'),
            e(d.client),
            e(d.endpoint),
            f"<code>{e(d.series)}</code>",
            e(size(d.bytes)),
            e(f"{size(d.bytes_per_second)}/s"),
            e(f"{d.seconds:.0f} s"),
        ]
        for d in downloads
    ]
    headers = ("user", "client", "endpoint", "series", "so far", "rate", "for")
    return _table(headers, rows, {4, 5, 6})


def render(snapshot: Snapshot) -> str:
    """The whole page."""
    s, now = snapshot, snapshot.generated_at
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(s.refresh_seconds)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>nbia-proxy status</title><style>{_STYLE}</style></head><body>",
        "<h1>nbia-proxy</h1>",
        f'<p class="muted">version {e(s.version)} · process {e(s.pid)} · access {e(s.access)} · '
        f"offline {'on' if s.offline else 'off'} · {e(when(now, now))} · refreshes every "
        f'{int(s.refresh_seconds)} s · <a href="status">JSON</a></p>',
        '<h2 id="alerts">Warnings</h2>',
    ]
    if s.alerts:
        parts += [f'<div class="alert {e(a.level)}">{e(a.message)}</div>' for a in s.alerts]
    else:
        parts.append('<p class="ok">nothing to act on</p>')
    parts += ['<h2 id="upstreams">Upstreams</h2>', _upstreams(s.upstreams, now)]
    parts.append('<h2 id="traffic">Requests</h2>')
    rates = s.rates
    if not rates.available:
        parts.append(f'<p class="muted">{e(rates.reason)}</p>')
    else:
        rps = "-" if rates.requests_per_second is None else f"{rates.requests_per_second:.2f}"
        ratio = "-" if rates.from_cache_ratio is None else f"{rates.from_cache_ratio:.0%}"
        parts.append(
            f"<p>over the last full minutes: <b>{e(rps)}</b> requests/s, "
            f"<b>{e(ratio)}</b> from the cache</p>"
        )
        parts.append(_minutes(rates.minutes))
    parts.append('<h2 id="cache">Cache</h2>')
    cache = s.cache
    if not cache.available:
        parts.append(f'<p class="warn">{e(cache.reason)}</p>')
    if cache.enabled:
        classes = [[e(c.name), e(c.entries), e(size(c.bytes))] for c in cache.classes]
        parts.append(_table(("class", "entries", "bytes"), classes, {1, 2}))
        memory = e(size(cache.memory_bytes))
        parts.append(f'<p class="muted">in this process\'s memory: {memory}</p>')
        parts += ["<h3>Largest collections</h3>", _collections(cache.largest_collections)]
        parts += ["<h3>Most used collections</h3>", _collections(cache.most_used_collections)]
        endpoints = [
            [e(r.endpoint), e(r.entries), e(size(r.bytes)), e(r.hits), e(r.misses)]
            for r in cache.endpoints
        ]
        parts += [
            "<h3>By endpoint</h3>",
            _table(("endpoint", "entries", "bytes", "hits", "misses"), endpoints, {1, 2, 3, 4}),
        ]
    parts += ['<h2 id="downloads">Downloads in progress</h2>', _downloads(s.downloads)]
    if s.downloads_not_shown:
        parts.append(
            f'<p class="muted">and {s.downloads_not_shown} more, not listed (the '
            f"{len(s.downloads)} that have run longest are)</p>"
        )
    disks = [
        [e(d.name), f"<code>{e(d.path)}</code>", e(size(d.free_bytes)), e(size(d.total_bytes)),
         '<span class="bad">nearly full</span>' if d.nearly_full else '<span class="ok">ok</span>']
        for d in s.disks
    ]  # fmt: skip
    parts += [
        '<h2 id="disks">Disks</h2>',
        _table(("dir", "path", "free", "size", ""), disks, {2, 3}),
    ]
    errors = [[e(when(r.at, now)), e(r.level), e(r.source), e(r.message)] for r in s.errors]
    parts += [
        '<h2 id="errors">Recent warnings and errors</h2>',
        _table(("when", "level", "source", "message"), errors, set()),
        "</body></html>",
    ]
    return "\n".join(parts)

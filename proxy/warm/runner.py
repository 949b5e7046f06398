"""The I/O of a warm run: requests through a gateway, progress on a stream, the record.

Everything goes through a gateway (``--gateway URL``, or one started in this process on the
same settings and data dir), so coalescing, the upstream limits and the shield apply as for any
client. Whether a series is already kept is the gateway's answer to its download: a kept zip
comes back as ``X-Cache: HIT`` with its sha256 as ETag and its age, and the run closes that
response without reading its body, so a second run costs one local request per series and
no upstream one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx

from proxy import __version__
from proxy.binary.fill import Fills
from proxy.config import Settings
from proxy.warm import plan, progress
from proxy.warm.plan import Cohort, Request

#: How long a request to the gateway may stay silent (a fill of a big zip can be slow to start).
READ_TIMEOUT_SECONDS = 300.0
#: How often the terminal line is redrawn.
REDRAW_SECONDS = 0.5
CHUNK_BYTES = 256 * 1024
#: Answers worth waiting for: the lab user's request rate (429), a gateway whose upstream queue
#: is full or whose upstream is resting (503). Both say how long in Retry-After.
RETRY_STATUSES = frozenset({429, 503})
RETRIES = 4
MAX_RETRY_WAIT_SECONDS = 60.0

Status = Literal["ready", "kept", "failed", "skipped"]


class Stopped(Exception):
    """The run was asked to stop (Ctrl-C) while a download was under way."""


class GatewayUnreachable(Exception):
    """No gateway answers at the URL given."""


class Refused(Exception):
    """The gateway refused the run's credentials (lab accounts): 401 or 403."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Outcome:
    """What became of one series' zip in one variant (the record's rows)."""

    series: str
    variant: str
    status: Status
    reason: str = ""
    size: int | None = None
    sha256: str | None = None
    fetched_at: float | None = None
    validation: str | None = None


@dataclass
class Result:
    """A finished (or stopped) run."""

    series: list[str]
    outcomes: list[Outcome]
    failures: dict[str, str]  # series (or a list request) -> reason
    fetched_bytes: int
    seconds: float
    stopped: bool
    collections: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return (
            not self.stopped
            and not self.failures
            and all(o.status in ("ready", "kept") for o in self.outcomes)
        )


class RateLimit:
    """At most ``rate`` bytes per second over every thread: each chunk waits for its slot."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, size: int, stop: threading.Event) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + size / self.rate
        # Sleep until the bytes' slot ends, so the bytes over time never exceed the rate.
        if stop.wait(max(0.0, self._next - now)):
            raise Stopped


class Display:
    """Writes progress: a redrawn line on a terminal, one line per series on a pipe."""

    def __init__(self, out: TextIO, tty: bool, quiet: bool = False) -> None:
        self.out, self.tty, self.quiet = out, tty, quiet
        self._drawn = False

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self._drawn:
            self.out.write("\r\x1b[K")
            self._drawn = False
        self.out.write(text + "\n")
        self.out.flush()

    def bar(self, state: progress.State) -> None:
        if self.quiet or not self.tty:
            return
        self.out.write("\r\x1b[K" + progress.bar_line(state, time.monotonic()))
        self.out.flush()
        self._drawn = True

    def end_bar(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


@dataclass
class Options:
    """A warm run's choices (from the command line and the settings)."""

    cohort: Cohort
    variants: tuple[str, ...] = (plan.DEFAULT_VARIANT,)
    metadata_only: bool = False
    concurrency: int = 2
    max_rate: int = 0


class Warmer:
    """One warm run against the gateway ``client`` talks to."""

    def __init__(
        self, client: httpx.Client, options: Options, display: Display, stop: threading.Event
    ) -> None:
        self.client = client
        self.options = options
        self.display = display
        self.stop = stop
        self.limit = RateLimit(options.max_rate)
        self._lock = threading.Lock()
        self.failures: dict[str, str] = {}
        self.collections: list[str] = []

    # --- metadata ---------------------------------------------------------

    def fetch(self, request: Request) -> httpx.Response | None:
        """A metadata request; None (and a failure noted) when it is not a 200 (after waiting
        out 429s and 503s)."""
        for attempt in range(RETRIES + 1):
            try:
                if request.method == "POST":
                    answer = self.client.post(request.path, data=dict(request.form))
                else:
                    answer = self.client.get(request.path, params=request.query)
            except httpx.HTTPError as exc:
                self._fail(request.describe(), _transport_reason(exc))
                return None
            wait = retry_wait(answer, attempt)
            if wait is None:
                break
            if self.stop.wait(wait):
                raise Stopped
        if answer.status_code in (401, 403):
            raise Refused(answer.status_code)
        if answer.status_code != 200:
            self._fail(request.describe(), _status_reason(answer))
            return None
        return answer

    def resolve(self, extra_series: Sequence[str]) -> list[str]:
        """The cohort's series: the collection's (as getSeries lists them), then the others."""
        cohort = self.options.cohort
        series: list[str] = []
        if cohort.collection:
            answer = self.fetch(Request("GET", "getSeries", plan.series_query(cohort)))
            if answer is not None:
                series = plan.series_of(plan.series_rows(answer.content))
                if not series:
                    self._fail(cohort.collection, "getSeries lists no series for this cohort")
        return plan.unique([*series, *extra_series])

    def warm_metadata(self, series: Sequence[str]) -> dict[str, int]:
        """Every list and metadata answer of the cohort; returns the announced sizes."""
        cohort = self.options.cohort
        collections = [cohort.collection] if cohort.collection else []
        sizes: dict[str, int] = {}
        for request in plan.metadata_requests(series):
            if self.stop.is_set():
                raise Stopped
            answer = self.fetch(request)
            if answer is None:
                continue
            if request.endpoint == "getSeriesMetadata":
                collections += plan.collections_of_metadata(answer.content)
            elif request.series is not None:
                size = plan.expected_size(answer.content)
                if size is not None:
                    sizes[request.series] = size
        self.collections = plan.unique(collections)
        for collection in self.collections:
            for request in plan.collection_requests(collection, cohort):
                if self.stop.is_set():
                    raise Stopped
                self.fetch(request)
        return sizes

    # --- zips -----------------------------------------------------------------

    def download(self, request: Request, state: progress.State) -> Outcome:
        """One zip through the gateway: kept already (HIT: not read), or fetched now."""
        assert request.series is not None and request.variant is not None
        outcome = Outcome(request.series, request.variant, "failed")
        try:
            for attempt in range(RETRIES + 1):
                with self.client.stream("GET", request.path, params=request.query) as answer:
                    wait = retry_wait(answer, attempt)
                    if wait is None:
                        return self._receive(answer, outcome, state)
                    answer.read()
                if self.stop.wait(wait):
                    raise Stopped
        except Stopped:
            outcome.status, outcome.reason = "skipped", "stopped before the download ended"
        except httpx.HTTPError as exc:
            outcome.reason = _transport_reason(exc)
        return outcome

    def _receive(self, answer: httpx.Response, outcome: Outcome, state: progress.State) -> Outcome:
        """Read a download's answer (not a HIT's body) into ``outcome``."""
        if answer.status_code != 200:
            answer.read()
            outcome.reason = _status_reason(answer)
            return outcome
        cache = answer.headers.get("x-cache", "")
        if cache == "HIT":
            return _kept_outcome(outcome, answer)
        if cache != "MISS":  # relayed, not kept: warming it would be for nothing
            outcome.reason = (
                f"the gateway does not keep this zip (X-Cache: {cache or 'none'}): "
                "is its series cache on (binary_cache_enabled)?"
            )
            return outcome
        digest = hashlib.sha256()
        size = 0
        for chunk in answer.iter_bytes(CHUNK_BYTES):
            if self.stop.is_set():
                raise Stopped
            self.limit.take(len(chunk), self.stop)
            digest.update(chunk)
            size += len(chunk)
            with self._lock:
                state.fetched_bytes += len(chunk)
        outcome.status = "ready"
        outcome.size, outcome.sha256, outcome.fetched_at = size, digest.hexdigest(), time.time()
        return outcome

    def warm_images(self, series: Sequence[str], sizes: dict[str, int]) -> list[Outcome]:
        """Every zip, ``concurrency`` at a time, with progress; stops cleanly on Ctrl-C."""
        requests = plan.image_requests(series, self.options.variants)
        state = progress.State(
            total=len(requests),
            started=time.monotonic(),
            expected_bytes=sum(sizes.get(r.series or "", 0) for r in requests),
        )
        outcomes: list[Outcome] = []
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency)
        pending: dict[Future[Outcome], Request] = {
            pool.submit(self.download, request, state): request for request in requests
        }
        try:
            while pending:
                done, _ = wait(pending, timeout=REDRAW_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    request = pending.pop(future)
                    outcome = future.result()
                    outcomes.append(outcome)
                    self._count(state, outcome, sizes.get(outcome.series, 0))
                self.display.bar(state)
        except KeyboardInterrupt:
            self.stop.set()
            self.display.line("nbia-proxy: stopping (Ctrl-C): ending the downloads under way")
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            self.display.end_bar()
        for future, request in pending.items():
            assert request.series is not None and request.variant is not None
            if future.cancelled():
                outcomes.append(Outcome(request.series, request.variant, "skipped", "not started"))
            else:
                outcomes.append(future.result())
        return outcomes

    def _count(self, state: progress.State, outcome: Outcome, announced: int) -> None:
        if outcome.status == "skipped":
            return
        with self._lock:
            if outcome.status == "ready":
                state.ready += 1
            elif outcome.status == "kept":
                state.kept += 1
            else:
                state.failed += 1
            state.done_bytes += announced
        detail = progress.human_bytes(outcome.size) if outcome.size is not None else ""
        if outcome.status == "failed":
            detail = outcome.reason
        label = {"ready": "fetched", "kept": "kept", "failed": "FAILED"}[outcome.status]
        self.display.line(progress.event_line(state, outcome.series, label, detail))

    def _fail(self, what: str, reason: str) -> None:
        with self._lock:
            self.failures[what] = reason
        self.display.line(f"failed: {what}: {reason}")


def run(
    client: httpx.Client,
    options: Options,
    extra_series: Sequence[str],
    display: Display,
    stop: threading.Event | None = None,
) -> Result:
    """A whole warm run: series list, metadata, then zips (unless ``metadata_only``)."""
    stop = stop or threading.Event()
    warmer = Warmer(client, options, display, stop)
    started = time.monotonic()
    series: list[str] = []
    outcomes: list[Outcome] = []
    try:
        series = warmer.resolve(extra_series)
        display.line(f"nbia-proxy: warming {len(series)} series")
        sizes = warmer.warm_metadata(series)
        if not options.metadata_only and not stop.is_set():
            outcomes = warmer.warm_images(series, sizes)
    except (KeyboardInterrupt, Stopped):
        stop.set()
    if stop.is_set():
        done = {(o.series, o.variant) for o in outcomes}
        outcomes += [
            Outcome(uid, variant, "skipped", "not started")
            for uid in series
            for variant in ([] if options.metadata_only else options.variants)
            if (uid, variant) not in done
        ]
    fetched = sum(o.size or 0 for o in outcomes if o.status == "ready")
    failures = dict(warmer.failures)
    for outcome in outcomes:
        if outcome.status == "failed":
            failures[outcome.series] = outcome.reason
    return Result(
        series,
        outcomes,
        failures,
        fetched,
        time.monotonic() - started,
        stop.is_set(),
        warmer.collections,
    )


def summary(result: Result) -> list[str]:
    """The closing lines of a run."""
    count: dict[str, int] = {"ready": 0, "kept": 0, "skipped": 0}
    for outcome in result.outcomes:
        if outcome.status in count:
            count[outcome.status] += 1
    lines = progress.summary_lines(
        count["ready"],
        count["kept"],
        result.failures,
        count["skipped"],
        result.fetched_bytes,
        result.seconds,
    )
    if result.stopped:
        lines.append("stopped: run the same command again to go on where this one ended")
    elif result.ready:
        lines.append("everything is ready for offline use")
    return lines


def record(
    result: Result, cohort: Cohort, manifest: Path | None, series_file: Path | None, gateway: str
) -> dict[str, Any]:
    """The cohort record: what was asked for, and each series' zips as kept."""
    source: dict[str, Any] = {k: v for k, v in asdict(cohort).items() if v and k != "series"}
    if manifest is not None:
        source["manifest"] = _file_source(manifest)
    if series_file is not None:
        source["series_file"] = _file_source(series_file)
    if cohort.series:
        source["series"] = list(cohort.series)
    by_series: dict[str, list[dict[str, Any]]] = {uid: [] for uid in result.series}
    for outcome in result.outcomes:
        row = {k: v for k, v in asdict(outcome).items() if k != "series" and v not in (None, "")}
        if row.get("fetched_at"):
            row["fetched_at"] = _iso(row["fetched_at"])
        by_series.setdefault(outcome.series, []).append(row)
    return {
        "nbia_proxy": __version__,
        "written_at": _iso(time.time()),
        "gateway": gateway,
        "cohort": source,
        "collections": result.collections,
        "complete": result.ready,
        "seconds": round(result.seconds, 1),
        "series": [{"series_instance_uid": uid, "zips": zips} for uid, zips in by_series.items()],
        "total_bytes": sum(o.size or 0 for o in result.outcomes if o.status in ("ready", "kept")),
    }


def write_record(path: Path, document: dict[str, Any]) -> None:
    """Write the record atomically (a stopped run leaves the previous one or the new one)."""
    part = path.with_name(path.name + ".part")
    # A fresh file, never through what is there: a link planted at the .part name (in a shared
    # directory) would otherwise have the record written over whatever it points to.
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    descriptor = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(json.dumps(document, indent=2) + "\n")
    os.replace(part, path)  # replaces a link at ``path`` itself, not what it points to


def _file_source(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "text": data.decode("utf-8", "replace"),
    }


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def retry_wait(answer: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before asking again after ``answer`` (the ``attempt``-th retry, from
    0), or None when it is an answer to keep: not a 429 or 503, or retried enough."""
    if answer.status_code not in RETRY_STATUSES or attempt >= RETRIES:
        return None
    value = answer.headers.get("retry-after", "").strip()
    seconds = float(value) if value.isdigit() else float(2**attempt)
    return min(seconds, MAX_RETRY_WAIT_SECONDS)


def _kept_outcome(outcome: Outcome, answer: httpx.Response) -> Outcome:
    """A HIT: the size, sha256 (the strong ETag) and fetch time (now less Age) of the kept file."""
    outcome.status = "kept"
    length = answer.headers.get("content-length")
    outcome.size = int(length) if length and length.isdigit() else None
    etag = answer.headers.get("etag", "").strip('"')
    outcome.sha256 = etag or None
    age = answer.headers.get("age", "")
    outcome.fetched_at = time.time() - (int(age) if age.isdigit() else 0)
    return outcome


def _status_reason(answer: httpx.Response) -> str:
    try:
        document = answer.json()
    except ValueError:
        document = None
    error = document.get("error") if isinstance(document, dict) else None
    text = error if isinstance(error, str) else answer.text.strip()[:200]
    return f"HTTP {answer.status_code}" + (f": {text}" if text else "")


def _transport_reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.RemoteProtocolError):
        # The gateway aborts a transfer whose zip failed its check (or whose upstream broke).
        return "the download was cut off: the zip failed the gateway's check or the upstream broke"
    if isinstance(exc, httpx.TimeoutException):
        return "the gateway did not answer in time"
    return f"{type(exc).__name__}: {exc}"


# --- the gateway ---------------------------------------------------------------------


def client_for(base: str, key: str | None, timeout: float = READ_TIMEOUT_SECONDS) -> httpx.Client:
    """An HTTP client for the gateway at ``base`` (``key``: a lab API key, as a bearer)."""
    headers = {"user-agent": f"nbia-proxy-warm/{__version__}"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(30.0, read=timeout))


def check_gateway(client: httpx.Client, root: str) -> None:
    """Raise :class:`GatewayUnreachable` unless an nbia-proxy gateway answers ``/healthz``
    at ``root`` (its base URL; the client's may be its ``/nlst`` mount)."""
    try:
        answer = client.get(root + "/healthz", timeout=10.0)
    except httpx.HTTPError as exc:
        raise GatewayUnreachable(_transport_reason(exc)) from None
    if answer.status_code >= 500 or answer.status_code == 404:
        raise GatewayUnreachable(f"/healthz answered {answer.status_code}")


@contextmanager
def local_gateway(settings: Settings) -> Iterator[str]:
    """A gateway on the same settings and data dir, in this process on a free loopback port;
    yields its base URL."""
    import uvicorn

    from proxy.app import create_app
    from proxy.server import Server, uvicorn_options

    # Only this process talks to it, on loopback: lab accounts are not asked for (the cache
    # keys do not depend on the lab user, so what it keeps serves every user).
    local = settings.model_copy(update={"host": "127.0.0.1", "port": 0, "access": "open"})
    options = uvicorn_options(local) | {"port": 0, "log_level": "warning", "lifespan": "on"}
    app = create_app(local)
    server = Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise GatewayUnreachable("the in-process gateway did not start (see the log above)")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if app.series is not None:
            _until_committed(app.series.fills)
        server.should_exit = True
        thread.join(timeout=30)


def _until_committed(fills: Fills) -> None:
    """Wait for the commits of downloads every client has read (each reads its file back for
    the sha256, seconds per GB): stopped, they would keep nothing. Fills still downloading
    (after Ctrl-C) are not waited for."""
    deadline = time.monotonic() + READ_TIMEOUT_SECONDS
    while any(f.checked and not f.done for f in fills.active()):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (then the progress line is redrawn in place)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stdout_display(quiet: bool = False) -> Display:
    """Progress and summary go to stdout: they are the command's output."""
    return Display(sys.stdout, is_terminal(sys.stdout), quiet)

"""``warm``, ``warm --check`` and ``cache ls`` from parsed arguments: the cohort they name, the
run, what is printed and the exit status (the argument parsing itself is in :mod:`proxy.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from proxy.config import Settings
from proxy.preflight import FAILURE, CommandError
from proxy.warm import ledger, plan, progress, runner
from proxy.warm.plan import Cohort

#: The exit status of a run stopped with Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
#: The largest --manifest or --series-file read: a million series' UIDs are about 65 MB.
MAX_COHORT_FILE_BYTES = 128 * 2**20


def cohort_of(args: argparse.Namespace) -> tuple[Cohort, list[str]]:
    """The cohort the flags name, and the series named by file or by UID (in order)."""
    collection = getattr(args, "cohort_collection", None)
    modality = getattr(args, "cohort_modality", None)
    body_part = getattr(args, "cohort_body_part", None)
    manifest: Path | None = getattr(args, "cohort_manifest", None)
    series_file: Path | None = getattr(args, "cohort_series_file", None)
    uids: list[str] = list(getattr(args, "cohort_series", []) or [])
    if (modality or body_part) and not collection:
        raise CommandError("--modality and --body-part filter a --collection: give one")
    if not (collection or manifest or series_file or uids):
        raise CommandError(
            "say what to warm: --collection NAME, --manifest FILE.tcia, --series UID... "
            "or --series-file FILE"
        )
    named: list[str] = []
    if manifest is not None:
        try:
            named += plan.parse_manifest(_read(manifest, "--manifest"))
        except plan.ManifestError as exc:
            raise CommandError(
                f"--manifest {manifest} {exc}: give the .tcia file NBIA's portal saved"
            ) from None
    if series_file is not None:
        try:
            named += plan.parse_series_file(_read(series_file, "--series-file"))
        except plan.ManifestError as exc:
            raise CommandError(f"--series-file {series_file} {exc}") from None
    for uid in uids:
        problem = plan.check_uid(uid)
        if problem is not None:
            raise CommandError(f"--series {problem}")
    named += uids
    cohort = Cohort(collection, modality, body_part, tuple(uids))
    return cohort, plan.unique(named)


def warm(args: argparse.Namespace, settings: Settings, base: str | None, key: str | None) -> int:
    """A warm run; ``base`` is a running gateway's URL (None: start one in this process)."""
    cohort, named = cohort_of(args)
    options = runner.Options(
        cohort,
        tuple(plan.unique(args.cohort_variants or [plan.DEFAULT_VARIANT])),
        args.metadata_only,
        settings.warm_concurrency,
        settings.warm_max_rate,
    )
    if base is None and not settings.cache_enabled:
        raise CommandError("warm fills the cache, which is off here (cache_enabled)")
    if base is None and not settings.binary_cache_enabled and not args.metadata_only:
        raise CommandError(
            "warm keeps zips in the series cache, which is off here (binary_cache_enabled): "
            "turn it on, or give --metadata-only"
        )
    record_path = args.record or Path.cwd() / f"nbia-warm-{_slug(cohort, args)}.json"
    _check_writable(record_path)
    gateway: AbstractContextManager[str] = (
        nullcontext(base) if base is not None else runner.local_gateway(settings)
    )
    display = runner.stdout_display()
    try:
        with gateway as url, runner.client_for(url + _mount(args), key) as client:
            try:
                runner.check_gateway(client, url)
            except runner.GatewayUnreachable as exc:
                raise CommandError(
                    f"no gateway answers at {url} ({exc}): start it (nbia-proxy serve) or "
                    "leave out --gateway to warm through one in this process"
                ) from None
            result = runner.run(client, options, named, display)
    except runner.Refused as exc:
        if key is None:
            raise CommandError(
                f"the gateway at {base} has lab accounts: put your API key in "
                "NBIA_PROXY_API_KEY or in a file named with --key-file"
            ) from None
        raise CommandError(f"the gateway at {base} refused the API key ({exc.status})") from None
    except runner.GatewayUnreachable as exc:
        raise CommandError(str(exc), FAILURE) from None
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's stop was under way
        raise CommandError("stopped (Ctrl-C) before the summary", INTERRUPTED) from None
    for line in runner.summary(result):
        display.line(line)
    document = runner.record(
        result, cohort, args.cohort_manifest, args.cohort_series_file, base or "in-process"
    )
    try:
        runner.write_record(record_path, document)
    except OSError as exc:  # the run is done and kept: say so, and that the record is not
        raise CommandError(
            f"the cache is warm, but the record {record_path} could not be written: "
            f"{exc.strerror} (warm again with another --record: what is kept is not fetched "
            "again)",
            FAILURE,
        ) from None
    display.line(f"record: {record_path}")
    if result.stopped:
        return INTERRUPTED
    return 0 if result.ready else FAILURE


def check(args: argparse.Namespace, settings: Settings) -> int:
    """``warm --check``: the listing, and 0 only if every series is ready offline."""
    return listing(args, settings, check=True)


def listing(args: argparse.Namespace, settings: Settings, check: bool = False) -> int:
    """``cache ls`` (and ``warm --check``): each series' state; exit 0 only if all are ready
    for ``warm --check`` (``cache ls`` lists and exits 0)."""
    from proxy.app import build_binaries, build_cache
    from proxy.cli import prepare_database

    cohort, named = cohort_of(args)
    if getattr(args, "metadata_only", False):
        variants: tuple[str, ...] = ()
    else:
        variants = tuple(plan.unique(args.cohort_variants or [plan.DEFAULT_VARIANT]))
    prepare_database(settings)
    cache = build_cache(settings) if settings.cache_enabled else None
    binaries = build_binaries(settings)
    engine = cache.store.engine if cache is not None else None
    try:
        series = list(named)
        if cohort.collection and engine is not None:
            series = plan.unique([*ledger.series_of_collection(engine, cohort), *series])
        states = ledger.states(engine, binaries, series, variants)
    finally:
        if cache is not None:
            cache.store.engine.dispose()
        if binaries is not None:
            binaries.engine.dispose()
    ready = sum(state.ready for state in states)
    if getattr(args, "ls_json", False):
        print(json.dumps([_state_document(state) for state in states], indent=2))
    else:
        for line in _table(states):
            print(line)
        print(_verdict(cohort, len(states), ready))
    if not check:
        return 0
    return 0 if states and ready == len(states) else FAILURE


def _mount(args: argparse.Namespace) -> str:
    """The gateway's mount for the cohort's server: ``/nlst`` for NLST, else its root."""
    return "/nlst" if getattr(args, "cohort_nlst", False) else ""


def _verdict(cohort: Cohort, total: int, ready: int) -> str:
    if not total:
        what = f"collection {cohort.collection}" if cohort.collection else "these series"
        return f"nothing of {what} is in the cache: warm it first (nbia-proxy warm)"
    if ready == total:
        return f"{ready} of {total} series ready: you can go offline"
    return f"{ready} of {total} series ready: {total - ready} not (run nbia-proxy warm again)"


def _table(states: list[ledger.SeriesState]) -> list[str]:
    lines = []
    for state in states:
        meta = "metadata" if state.metadata else "NO-METADATA"
        if state.metadata and state.metadata_expires_at and state.metadata_expires_at < time.time():
            meta = "metadata(expired)"
        zips = [
            f"zip:{z.variant} {progress.human_bytes(z.size)} validated:{z.validation} "
            f"fetched:{_iso(z.fetched_at)}"
            for z in state.zips
        ]
        zips += [f"zip:{variant} MISSING" for variant in state.missing_variants]
        mark = "ready  " if state.ready else "MISSING"
        lines.append("  ".join([mark, state.uid, meta, *zips]))
    return lines


def _state_document(state: ledger.SeriesState) -> dict[str, Any]:
    document = asdict(state)
    document["ready"] = state.ready
    return document


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _slug(cohort: Cohort, args: argparse.Namespace) -> str:
    name = (
        cohort.collection
        or (args.cohort_manifest.stem if args.cohort_manifest else None)
        or (args.cohort_series_file.stem if args.cohort_series_file else "series")
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _read(path: Path, flag: str) -> str:
    """The text of a cohort file: UTF-8, a byte order mark dropped (as Windows editors save
    it), at most :data:`MAX_COHORT_FILE_BYTES` (not a whole disk image read into memory)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_COHORT_FILE_BYTES + 1)
        if len(data) > MAX_COHORT_FILE_BYTES:
            raise CommandError(
                f"{flag} {path} is larger than {MAX_COHORT_FILE_BYTES // 2**20} MiB: "
                "not a list of series (split the cohort)"
            )
        return data.decode("utf-8-sig")
    except FileNotFoundError:
        raise CommandError(f"{flag} {path}: no such file (check the path)") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CommandError(f"{flag} {path} cannot be read: {reason}") from None


def _check_writable(path: Path) -> None:
    """The record's directory must exist before an hour of downloads, not after."""
    if not path.parent.is_dir():
        raise CommandError(f"--record {path}: {path.parent} is not a directory (create it first)")
    if path.is_dir():
        raise CommandError(f"--record {path} is a directory: name the file to write")
    if not os.access(path.parent, os.W_OK):
        raise CommandError(f"--record {path}: {path.parent} is not writable by this user")

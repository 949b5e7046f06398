"""The ``nbia-proxy`` command line.

``serve`` (the default) runs the gateway; ``migrate`` brings the database schema up to date;
``cache stats`` and ``cache purge`` inspect and empty the cache (its kept series files too)
directly in its database and ``binary_dir``, so they work whether a gateway is running or not
(running gateways drop purged memory copies within ``cache_recheck_seconds``); ``cache stats
--from URL`` asks a running gateway instead; ``cache verify`` hashes the kept files again and
removes those whose bytes no longer match.

Every failure is one line on stderr starting with ``nbia-proxy:`` and saying what to do, never a
traceback. The exit status tells which side must change:

* 2, a usage error: the command line, a setting, the config file or the environment is wrong,
  or names something that cannot work as given (a data dir that is a file or not writable, a
  read-only database, a database URL of an unsupported kind, a missing or refused admin key, a
  URL that is not a gateway's). Running the same command again cannot succeed.
* 1, a runtime failure: something the command needs did not do its part (PostgreSQL or the
  gateway does not answer, a lab account that does not exist or exists already). Running the
  same command again may succeed once that is mended.

Checks of values live in :mod:`proxy.config`; checks of the file system and the network that
each command needs run first, in :mod:`proxy.preflight`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

from pydantic import SecretStr

from proxy import __version__
from proxy.config import ENV_PREFIX, InvalidSettings, Settings, load_settings, unknown_variables
from proxy.preflight import (
    FAILURE,
    USAGE,
    CommandError,
    check_audit_log,
    check_data_dir,
    check_database,
    check_listen,
)

if TYPE_CHECKING:
    from proxy.binary.files import BinaryStore

#: Secrets are never taken from the command line, where ``ps`` would show them.
_NO_FLAG = frozenset({"password", "nlst_password", "metrics_token"})
#: How ``serve --workers N`` hands the parent's settings to each worker process.
_SETTINGS_ENV = "NBIA_PROXY_WORKER_SETTINGS"
#: The admin key ``cache stats --from`` sends (or ``--key-file``; never a flag value).
_ADMIN_KEY_ENV = "NBIA_PROXY_ADMIN_KEY"
#: The lab API key ``warm --gateway`` sends to a gateway with lab accounts (or ``--key-file``).
_API_KEY_ENV = "NBIA_PROXY_API_KEY"
#: Variables of the command itself, not settings (so not warned about).
_COMMAND_VARIABLES = frozenset({ENV_PREFIX + "CONFIG", _SETTINGS_ENV, _ADMIN_KEY_ENV, _API_KEY_ENV})
_STATS_PATH = "/_proxy/cache/stats"
_STATS_TIMEOUT_SECONDS = 30.0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (argparse prints the whole usage, ~40 lines, first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"nbia-proxy: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: `--password x` must not be taken as `--password-file x`.
    parser = _Parser(
        prog="nbia-proxy",
        description="A local caching gateway for the NBIA REST API.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"nbia-proxy {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the gateway (default)", allow_abbrev=False)
    _add_settings_flags(serve)
    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    _add_settings_flags(migrate)
    cache = commands.add_parser("cache", help="inspect or empty the cache")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_commands.add_parser("stats", help="entries, bytes, hits and misses (JSON)")
    stats.add_argument(
        "--from",
        dest="stats_from",
        metavar="URL",
        help="ask a running gateway instead (adds its live shield counters, circuit and queue)",
    )
    stats.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help=f"with --from: file holding an admin's API key, for a gateway with lab accounts "
        f"(or env {_ADMIN_KEY_ENV}; never on the command line)",
    )
    _add_settings_flags(stats)
    purge = cache_commands.add_parser(
        "purge", help="delete what matches all the given filters, or everything with --all"
    )
    purge.add_argument(
        "--path", dest="purge_path", type=_filter, help="endpoint glob, e.g. 'v4/getSeries*'"
    )
    purge.add_argument(
        "--collection", dest="purge_collection", type=_filter, help="a Collection name"
    )
    purge.add_argument("--series", dest="purge_series", type=_filter, help="a SeriesInstanceUID")
    purge.add_argument(
        "--all", dest="purge_all", action="store_true", help="delete every entry (no filter)"
    )
    _add_settings_flags(purge)
    verify = cache_commands.add_parser(
        "verify", help="hash kept files again, remove those that do not match (JSON)"
    )
    verify.add_argument(
        "--collection",
        dest="verify_collection",
        type=_verify_filter,
        help="only this Collection's kept files (its series as the cached getSeries list them)",
    )
    _add_settings_flags(verify)
    _add_ls_parser(cache_commands)
    _name_commands(cache_commands)
    _add_warm_parser(commands)
    users = commands.add_parser("users", help="lab accounts (for access = accounts)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    add = user_commands.add_parser("add", help="create a user and print their API key once")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may use /_proxy/ (cache control)")
    _add_settings_flags(add)
    listing = user_commands.add_parser("list", help="users, their role and status (JSON)")
    _add_settings_flags(listing)
    for verb, text in (
        ("revoke", "lock a user out: key and tokens stop working"),
        ("rotate", "print a new key for a user (the old key and tokens stop working)"),
    ):
        command = user_commands.add_parser(verb, help=text)
        command.add_argument("name")
        _add_settings_flags(command)
    _name_commands(user_commands)
    return parser


def _name_commands(commands: Any) -> None:
    """A missing subcommand is reported by its choices, not by its internal ``dest``."""
    commands.metavar = "{" + ",".join(commands.choices) + "}"


def _filter(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("is empty: give a value, or --all to purge everything")
    return value


def _verify_filter(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("is empty: give a Collection name, or leave it out")
    return value


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("""not a JSON object, e.g. '{"v4/getSeries*": 3600}'""")
    return parsed


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, generated from :class:`Settings` so none is forgotten."""
    parser.add_argument("--config", type=Path, help="TOML settings file (env NBIA_PROXY_CONFIG)")
    for name, field in Settings.model_fields.items():
        if name in _NO_FLAG:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} (env NBIA_PROXY_{name.upper()})"
        # Defaults are None so that only flags actually given override env and file values.
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif field.annotation == dict[str, float]:
            parser.add_argument(flag, dest=name, type=_json_object, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from flags, the environment and the config file, in that order of strength."""
    config = args.config or (
        Path(os.environ["NBIA_PROXY_CONFIG"]) if os.environ.get("NBIA_PROXY_CONFIG") else None
    )
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return load_settings(config, **flags)


def serve(settings: Settings) -> None:
    """Run the gateway in the foreground until interrupted."""
    import uvicorn

    from proxy import stop_deadline
    from proxy.app import create_app
    from proxy.logs import configure_logging
    from proxy.metrics import clear_shared
    from proxy.server import raise_file_limit, serve_app, uvicorn_options

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    raise_file_limit()  # before the workers start: they inherit it
    if settings.workers == 1:
        stop_deadline.arm(settings.shutdown_cleanup_seconds)
        serve_app(create_app(settings), settings)
        return
    # Several processes: migrate once here, then let each worker build its app from the
    # settings passed down in the environment (workers must not race on migrations).
    if (settings.cache_enabled or settings.access == "accounts") and settings.auto_migrate:
        run_migrations(settings)
    clear_shared(settings.data_dir)  # the workers' metrics files of an earlier run
    os.environ[_SETTINGS_ENV] = json.dumps(_plain(settings))
    options = uvicorn_options(settings)
    uvicorn.run("proxy.cli:worker_app", factory=True, workers=settings.workers, **options)


def worker_app() -> Any:
    """App factory for ``serve --workers N`` (called in each worker process)."""
    from proxy import stop_deadline
    from proxy.app import create_app
    from proxy.logs import configure_logging

    values = json.loads(os.environ[_SETTINGS_ENV])
    settings = Settings(**values | {"auto_migrate": False})
    configure_logging(settings.log_level)
    stop_deadline.arm(settings.shutdown_cleanup_seconds)
    return create_app(settings)


def run_migrations(settings: Settings) -> str:
    """Upgrade the configured database to the newest schema; return its URL (password hidden)."""
    from sqlalchemy.engine import make_url

    from proxy.datadir import prepare
    from proxy.db import database_url, migrate

    prepare(settings)  # the data dir 0700 and the SQLite files 0600, before SQLite makes them
    url = database_url(settings.database_url, settings.data_dir)
    migrate(url)
    return make_url(url).render_as_string(hide_password=True)


def _plain(settings: Settings) -> dict[str, Any]:
    # The files were read already (their secrets are in the values): not read again.
    read = {"password_file", "nlst_password_file", "metrics_token_file", "database_password_file"}
    values = settings.model_dump(mode="json", exclude=read)
    for name in ("password", "nlst_password", "metrics_token"):
        secret = getattr(settings, name)
        values[name] = secret.get_secret_value() if isinstance(secret, SecretStr) else None
    return values


def run_cache_command(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """``cache stats`` / ``purge`` / ``verify`` straight on the database and ``binary_dir``
    (or ``stats --from URL``)."""
    from proxy.app import build_binaries, build_cache
    from proxy.control import (
        binaries_document,
        purge_binaries,
        series_by_collection,
        stats_document,
    )

    if args.cache_command == "stats" and args.stats_from:
        return fetch_stats(args.stats_from, _admin_key(args.key_file))
    if args.cache_command == "stats" and args.key_file:
        raise CommandError("--key-file goes with --from (the database itself needs no key)")
    if args.cache_command == "verify" and not settings.binary_cache_enabled:
        raise CommandError(
            "cache verify checks the series cache, which is off here (binary_cache_enabled)"
        )
    filters = _purge_filters(args) if args.cache_command == "purge" else {}
    prepare_database(settings)
    binaries = build_binaries(settings)
    if args.cache_command == "verify":
        assert binaries is not None  # binary_cache_enabled, checked above
        try:
            known = series_by_collection(binaries.engine) if args.verify_collection else {}
            return verify_binaries(binaries, args.verify_collection, known)
        finally:
            binaries.engine.dispose()
    cache = build_cache(settings)
    try:
        if args.cache_command == "stats":
            extra = {} if binaries is None else {"binaries": binaries_document(binaries.stats())}
            return stats_document(cache.store.stats(), extra)
        known = series_by_collection(cache.store.engine) if "collection" in filters else {}
        entries, size = cache.store.purge(**filters)
        kept = {} if binaries is None else purge_binaries(binaries, filters, known)
        return {"purged_entries": entries, "purged_bytes": size, **kept}
    finally:
        cache.store.engine.dispose()
        if binaries is not None:
            binaries.engine.dispose()


def verify_binaries(
    store: BinaryStore, collection: str | None, known: dict[str, set[str]]
) -> dict[str, Any]:
    """``cache verify``: the kept files' counts checked, damaged, missing and removed; with a
    collection, its files as :func:`proxy.control.purge_binaries` finds them."""
    from dataclasses import asdict

    from proxy.binary.files import MARKER

    if not store.mounted() and store.stats().files:
        raise CommandError(
            f"{store.directory} has no {MARKER}: not the directory the database describes "
            "(is the volume mounted? is binary_dir right?); nothing was checked"
        )
    series = known.get(collection, set()) if collection else set()
    return asdict(store.verify(collection=collection, collection_series=series))


def _purge_filters(args: argparse.Namespace) -> dict[str, str]:
    """The filters of ``cache purge``: everything only when asked for with ``--all``."""
    given = {
        name: value
        for name, value in (
            ("pattern", args.purge_path),
            ("collection", args.purge_collection),
            ("series", args.purge_series),
        )
        if value is not None
    }
    if args.purge_all and given:
        raise CommandError(
            "--all deletes everything: give it without --path, --collection or --series"
        )
    if not (args.purge_all or given):
        raise CommandError(
            "cache purge deletes what matches --path, --collection or --series; "
            "give --all to delete everything"
        )
    return given


def fetch_stats(url: str, key: tuple[str, str] | None) -> dict[str, Any]:
    """``GET /_proxy/cache/stats`` of the gateway at ``url``; ``key`` is an admin's API key and
    where it came from, sent as ``Authorization: Bearer`` (a gateway with lab accounts needs it)."""
    import httpx

    base = _gateway_base(url)
    headers = {"Authorization": f"Bearer {key[0]}"} if key else {}
    try:
        answer = httpx.get(base + _STATS_PATH, headers=headers, timeout=_STATS_TIMEOUT_SECONDS)
    except httpx.TimeoutException:
        raise CommandError(
            f"the gateway at {base} did not answer within {_STATS_TIMEOUT_SECONDS:g} s", FAILURE
        ) from None
    except httpx.InvalidURL:
        raise CommandError("--from takes the gateway's URL, e.g. http://127.0.0.1:8080") from None
    except httpx.HTTPError as exc:
        reason = (str(exc).rpartition("] ")[2] or type(exc).__name__).lower().rstrip(".")
        if isinstance(exc, httpx.ConnectError):
            message = f"nothing answers at {base} ({reason}): is the gateway running there?"
        else:
            message = f"no HTTP answer from {base} ({reason}): is it the gateway's address?"
        raise CommandError(message, FAILURE) from None
    if answer.status_code in (401, 403):
        raise CommandError(_refusal(base, answer.status_code, key[1] if key else None))
    try:
        document = answer.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise CommandError(f"{base} is not an nbia-proxy gateway (no JSON at {_STATS_PATH})")
    if answer.status_code != 200:
        error = document.get("error", "no reason given")
        raise CommandError(f"the gateway at {base} answered {answer.status_code}: {error}", FAILURE)
    return document


def _refusal(base: str, status: int, key_source: str | None) -> str:
    """What to do when a gateway with lab accounts refuses ``cache stats --from``."""
    if key_source is None:
        return (
            f"the gateway at {base} has lab accounts: put an admin's API key in "
            f"{_ADMIN_KEY_ENV} or in a file named with --key-file"
        )
    if status == 401:
        return (
            f"the gateway at {base} refused the key from {key_source}: check it "
            "(nbia-proxy users rotate NAME prints a new one)"
        )
    return (
        f"the gateway at {base} shows its stats to admins only, and the key from {key_source} "
        "is a member's (nbia-proxy users add NAME --admin makes an admin)"
    )


def _gateway_base(url: str, flag: str = "--from") -> str:
    example = "e.g. http://127.0.0.1:8080"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CommandError(f"{flag} takes the gateway's URL, starting with http://, {example}")
    if parts.username is not None or parts.password is not None:
        # Refused, not used: the URL would be printed in messages and kept in warm's record.
        # Said without echoing the URL, whose password is what must not show.
        raise CommandError(
            f"{flag} takes the gateway's URL without a user name or password in it (an API key "
            f"goes in {_API_KEY_ENV if flag == '--gateway' else _ADMIN_KEY_ENV} or in a file "
            "named with --key-file)"
        )
    path_parts = {part.lower() for part in parts.path.split("/")}
    if parts.query or parts.fragment or path_parts & {"nbia-api", "_proxy"}:
        raise CommandError(f"{flag} takes the gateway's base URL, {example}")
    return url.rstrip("/")


def _admin_key(key_file: Path | None) -> tuple[str, str] | None:
    """The admin key and where it came from: ``--key-file`` (which wins) or the environment."""
    if key_file is None:
        key = os.environ.get(_ADMIN_KEY_ENV, "").strip()
        return (key, _ADMIN_KEY_ENV) if key else None
    try:
        key = key_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CommandError(f"--key-file {key_file} cannot be read: {reason}") from None
    if not key:
        raise CommandError(f"--key-file {key_file} is empty")
    with contextlib.suppress(OSError):
        if key_file.stat().st_mode & stat.S_IROTH:
            # Warned, not refused (a key shared on purpose is the user's call), as loudly as
            # the start-up warnings: every account on the machine can read this key.
            print(
                f"nbia-proxy: warning: --key-file {key_file} can be read by every user of this "
                f"machine: chmod 600 {key_file}",
                file=sys.stderr,
            )
    return key, f"--key-file {key_file}"


def prepare_database(settings: Settings) -> str:
    """Check the database can be used, bring its schema up to date; return its URL."""
    check_database(settings)
    return run_migrations(settings)


def run_users_command(args: argparse.Namespace, settings: Settings) -> str:
    """``users add|list|revoke|rotate`` straight on the database; returns what to print."""
    from proxy.accounts.registry import Registry
    from proxy.db import database_url, make_engine

    prepare_database(settings)
    engine = make_engine(database_url(settings.database_url, settings.data_dir))
    registry = Registry(engine)
    try:
        if args.users_command == "add":
            key = registry.add(args.name, admin=args.admin)
            return f"{_key_notice(args.name)}\n{key}"
        if args.users_command == "rotate":
            return f"{_key_notice(args.name)}\n{registry.rotate(args.name)}"
        if args.users_command == "revoke":
            registry.revoke(args.name)
            return (
                f"nbia-proxy: {args.name} is revoked (running gateways follow within "
                f"{settings.accounts_refresh_seconds:g} s)"
            )
        listing = [
            {
                "name": user.name,
                "admin": user.admin,
                "status": "active" if user.active else "revoked",
                "created_at": user.created_at,
                "key_changed_at": user.key_changed_at,
            }
            for user in registry.users()
        ]
        return json.dumps(listing, indent=2)
    finally:
        engine.dispose()


def _key_notice(name: str) -> str:
    return (
        f"# API key of {name}: shown once, stored only as a salted hash. Use it as "
        "`Authorization: Bearer <key>`, or as the password of an NBIA login with this user name."
    )


def _add_cohort_flags(parser: argparse.ArgumentParser, *, series: bool) -> None:
    """The flags that name a cohort (``warm``; ``cache ls`` takes the first two)."""
    from proxy.warm.plan import DEFAULT_VARIANT, VARIANTS

    parser.add_argument(
        "--collection", dest="cohort_collection", type=_cohort_value, help="a Collection name"
    )
    parser.add_argument(
        "--manifest",
        dest="cohort_manifest",
        type=Path,
        metavar="FILE.tcia",
        help="an NBIA manifest, as the portal saves it",
    )
    if series:
        parser.add_argument(
            "--modality",
            dest="cohort_modality",
            type=_cohort_value,
            help="with --collection: only series of this Modality, e.g. CT",
        )
        parser.add_argument(
            "--body-part",
            dest="cohort_body_part",
            type=_cohort_value,
            help="with --collection: only this BodyPartExamined, e.g. CHEST",
        )
        parser.add_argument(
            "--series",
            dest="cohort_series",
            nargs="+",
            action="extend",
            default=[],
            metavar="UID",
            help="SeriesInstanceUIDs",
        )
        parser.add_argument(
            "--series-file",
            dest="cohort_series_file",
            type=Path,
            metavar="FILE",
            help="a file of SeriesInstanceUIDs, one a line",
        )
    parser.add_argument(
        "--variant",
        dest="cohort_variants",
        action="append",
        choices=sorted(VARIANTS),
        help=f"which zip of each series (repeatable; default {DEFAULT_VARIANT}: the one "
        "tcia-utils downloadSeries asks for, getImage?NewFileNames=Yes; plain: getImage; "
        "md5: getImageWithMD5Hash)",
    )


def _add_ls_parser(cache_commands: Any) -> None:
    listing = cache_commands.add_parser(
        "ls", help="what the cache holds of a collection or a manifest, series by series"
    )
    _add_cohort_flags(listing, series=False)
    listing.add_argument("--json", dest="ls_json", action="store_true", help="print JSON")
    _add_settings_flags(listing)


def _add_warm_parser(commands: Any) -> None:
    warm = commands.add_parser(
        "warm",
        help="fill the cache with a collection, a manifest or series, for offline work",
        allow_abbrev=False,
    )
    _add_cohort_flags(warm, series=True)
    warm.add_argument(
        "--nlst",
        dest="cohort_nlst",
        action="store_true",
        help='the cohort is on the NLST server (tcia-utils api_url="nlst"): warm it through '
        "the gateway's /nlst mount",
    )
    warm.add_argument("--metadata-only", action="store_true", help="lists and metadata, no zips")
    warm.add_argument(
        "--check",
        dest="warm_check",
        action="store_true",
        help="fetch nothing: list what is ready; exit 0 only if all of it is",
    )
    warm.add_argument(
        "--gateway",
        metavar="URL",
        help="a running gateway (default: one in this process, same settings)",
    )
    warm.add_argument(
        "--key-file",
        type=Path,
        metavar="FILE",
        help=f"with --gateway: file holding your lab API key (or env {_API_KEY_ENV}; never "
        "on the command line)",
    )
    warm.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="where the cohort record goes (default ./nbia-warm-NAME.json)",
    )
    # Short names for the two warm settings (their long flags come with the settings).
    warm.add_argument(
        "--concurrency",
        dest="warm_concurrency",
        metavar="N",
        help="zips downloaded at once (setting warm_concurrency)",
    )
    warm.add_argument(
        "--max-rate",
        dest="warm_max_rate",
        metavar="BYTES_PER_S",
        help="at most this many bytes/s from upstream (setting warm_max_rate)",
    )
    _add_settings_flags(warm)


def _cohort_value(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty")
    return value


def run_warm_command(args: argparse.Namespace, settings: Settings) -> int:
    """``warm``: fill the cache for a cohort through a gateway (or ``--check`` it)."""
    from proxy.warm import command

    if args.warm_check:
        if args.gateway or args.key_file:
            raise CommandError(
                "warm --check reads the cache's own database (from the settings): "
                "leave out --gateway and --key-file"
            )
        return command.check(args, settings)
    key = _api_key(args.key_file) if args.gateway else None
    if args.key_file and not args.gateway:
        raise CommandError("--key-file goes with --gateway (the in-process gateway needs no key)")
    if args.gateway:
        base = _gateway_base(args.gateway, "--gateway")
        return command.warm(args, settings, base, key)
    check_data_dir(settings.data_dir)
    check_database(settings)
    return command.warm(args, settings, None, None)


def run_cache_ls(args: argparse.Namespace, settings: Settings) -> int:
    """``cache ls``: each series of a cohort and what the cache holds of it."""
    from proxy.warm import command

    return command.listing(args, settings)


def _api_key(key_file: Path | None) -> str | None:
    """A lab API key from ``--key-file`` (which wins) or the environment."""
    if key_file is None:
        return os.environ.get(_API_KEY_ENV, "").strip() or None
    found = _admin_key(key_file)
    return found[0] if found else None


def with_default_command(argv: list[str]) -> list[str]:
    """``nbia-proxy --port 9000`` means ``nbia-proxy serve --port 9000``."""
    argv = list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nbia-proxy`` command (exit statuses: see the module docstring)."""
    args = build_parser().parse_args(with_default_command(sys.argv[1:] if argv is None else argv))
    for warning in unknown_variables(os.environ, _COMMAND_VARIABLES):
        print(f"nbia-proxy: warning: {warning}", file=sys.stderr)
    try:
        settings = settings_from_args(args)
        return _run(args, settings)
    except InvalidSettings as exc:
        # One line per bad setting, without echoing the value (it might be a secret).
        for line in exc.lines:
            print(f"nbia-proxy: {line}", file=sys.stderr)
        return USAGE
    except CommandError as exc:
        print(f"nbia-proxy: {exc}", file=sys.stderr)
        return exc.exit_status


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from proxy.db import database_url
    from proxy.errors import AccountError
    from proxy.preflight import database_failure

    try:
        if args.command == "serve":
            check_data_dir(settings.data_dir)
            check_audit_log(settings)
            check_listen(settings.host, settings.port)
            if settings.cache_enabled or settings.access == "accounts":
                check_database(settings)
            serve(settings)
        elif args.command == "migrate":
            print(f"nbia-proxy: database at {prepare_database(settings)} is up to date")
        elif args.command == "warm":
            return run_warm_command(args, settings)
        elif args.command == "cache" and args.cache_command == "ls":
            return run_cache_ls(args, settings)
        elif args.command == "cache":
            print(json.dumps(run_cache_command(args, settings), indent=2))
        elif args.command == "users":
            print(run_users_command(args, settings))
    except AccountError as exc:
        raise CommandError(str(exc), FAILURE) from None
    except SQLAlchemyError as exc:
        # Past the preflight checks (e.g. a schema PostgreSQL will not let this user create).
        raise database_failure(
            exc, database_url(settings.database_url, settings.data_dir)
        ) from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

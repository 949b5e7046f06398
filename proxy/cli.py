"""The ``nbia-proxy`` command line.

``serve`` (the default) runs the gateway; ``migrate`` brings the database schema up to date;
``cache stats`` and ``cache purge`` inspect and empty the cache directly in its database, so they
work whether a gateway is running or not (running gateways drop purged memory copies within
``cache_recheck_seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from proxy import __version__
from proxy.config import Settings, load_settings

#: Secrets are never taken from the command line, where ``ps`` would show them.
_NO_FLAG = frozenset({"password", "nlst_password"})
#: How ``serve --workers N`` hands the parent's settings to each worker process.
_SETTINGS_ENV = "NBIA_PROXY_WORKER_SETTINGS"


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: `--password x` must not be taken as `--password-file x`.
    parser = argparse.ArgumentParser(
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
    _add_settings_flags(stats)
    purge = cache_commands.add_parser(
        "purge", help="delete everything, or what matches all the given filters"
    )
    purge.add_argument("--path", dest="purge_path", help="endpoint glob, e.g. 'v4/getSeries*'")
    purge.add_argument("--collection", dest="purge_collection", help="a Collection name")
    purge.add_argument("--series", dest="purge_series", help="a SeriesInstanceUID")
    _add_settings_flags(purge)
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
    return parser


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
            parser.add_argument(flag, dest=name, type=json.loads, metavar="JSON", help=help_text)
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

    from proxy.app import create_app
    from proxy.logs import configure_logging
    from proxy.server import raise_file_limit, serve_app, uvicorn_options

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    raise_file_limit()  # before the workers start: they inherit it
    if settings.workers == 1:
        serve_app(create_app(settings), settings)
        return
    # Several processes: migrate once here, then let each worker build its app from the
    # settings passed down in the environment (workers must not race on migrations).
    if (settings.cache_enabled or settings.access == "accounts") and settings.auto_migrate:
        run_migrations(settings)
    os.environ[_SETTINGS_ENV] = json.dumps(_plain(settings))
    options = uvicorn_options(settings)
    uvicorn.run("proxy.cli:worker_app", factory=True, workers=settings.workers, **options)


def worker_app() -> Any:
    """App factory for ``serve --workers N`` (called in each worker process)."""
    from proxy.app import create_app
    from proxy.logs import configure_logging

    values = json.loads(os.environ[_SETTINGS_ENV])
    settings = Settings(**values | {"auto_migrate": False})
    configure_logging(settings.log_level)
    return create_app(settings)


def run_migrations(settings: Settings) -> str:
    """Upgrade the configured database to the newest schema; return its URL (password hidden)."""
    from sqlalchemy.engine import make_url

    from proxy.db import database_url, migrate

    url = database_url(settings.database_url, settings.data_dir)
    migrate(url)
    return make_url(url).render_as_string(hide_password=True)


def _plain(settings: Settings) -> dict[str, Any]:
    values = settings.model_dump(mode="json", exclude={"password_file"})
    for name in ("password", "nlst_password"):
        secret = getattr(settings, name)
        values[name] = secret.get_secret_value() if isinstance(secret, SecretStr) else None
    return values


def run_cache_command(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """``cache stats`` / ``cache purge`` straight on the database."""
    from proxy.app import build_cache
    from proxy.control import stats_document

    if args.cache_command == "stats" and args.stats_from:
        import httpx

        answer = httpx.get(args.stats_from.rstrip("/") + "/_proxy/cache/stats", timeout=30)
        answer.raise_for_status()
        return dict(answer.json())
    run_migrations(settings)
    cache = build_cache(settings)
    try:
        if args.cache_command == "stats":
            return stats_document(cache.store.stats(), {})
        entries, size = cache.store.purge(
            pattern=args.purge_path, collection=args.purge_collection, series=args.purge_series
        )
        return {"purged_entries": entries, "purged_bytes": size}
    finally:
        cache.store.engine.dispose()


def run_users_command(args: argparse.Namespace, settings: Settings) -> str:
    """``users add|list|revoke|rotate`` straight on the database; returns what to print."""
    from proxy.accounts.registry import Registry
    from proxy.db import database_url, make_engine

    run_migrations(settings)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nbia-proxy`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        # One line per bad setting, without echoing the value (it might be a secret).
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"nbia-proxy: invalid setting {where}: {error['msg']}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"nbia-proxy: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
    elif args.command == "migrate":
        print(f"nbia-proxy: database at {run_migrations(settings)} is up to date")
    elif args.command == "cache":
        print(json.dumps(run_cache_command(args, settings), indent=2))
    elif args.command == "users":
        from proxy.accounts.registry import AccountError

        try:
            print(run_users_command(args, settings))
        except AccountError as exc:
            print(f"nbia-proxy: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The ``nbia-proxy`` command line: ``serve`` (the default)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from proxy import __version__
from proxy.config import Settings, load_settings


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
    return parser


#: Secrets are never taken from the command line, where ``ps`` would show them.
_NO_FLAG = frozenset({"password", "nlst_password"})


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

    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,
        # The upstream's own Date and Server headers are relayed instead.
        server_header=False,
        date_header=False,
        access_log=False,
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

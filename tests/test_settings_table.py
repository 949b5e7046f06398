"""Every setting is a knob a user can turn three ways, and the README table says its default.

For each field of :class:`proxy.config.Settings`: the README's settings table gives the default
the code has (a literal in backticks must equal it; prose is allowed only where the default is
not one value, e.g. "none" or "`binaries` in `data_dir`"), and a value other than the default
is read from a flag (except the secrets, which have none), from its ``NBIA_PROXY_*`` variable
and from a TOML settings file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import _NO_FLAG, build_parser, settings_from_args
from proxy.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `([a-z_0-9]+)` \| `NBIA_PROXY_[A-Z_0-9]+` \| (.*?) \| .* \|$", re.M)
#: Defaults that are not one literal value, as the README words them.
PROSE_DEFAULTS = {
    "trusted_proxies": "none",
    "password": "empty",
    "password_file": "none",
    "nlst_username": "the main account",
    "nlst_password": "the main password",
    "nlst_password_file": "none",
    "token_secret_file": "none",
    "audit_log": "`audit.log` in `data_dir`",
    "metrics_token": "none",
    "metrics_token_file": "none",
    "database_url": "SQLite file in `data_dir`",
    "database_password_file": "none",
    "binary_dir": "`binaries` in `data_dir`",
    "redis_url": "empty",
}
#: Secrets with no flag (a flag shows in ``ps``).
SECRETS = {"password", "nlst_password", "metrics_token"}


def readme_defaults() -> dict[str, str]:
    return dict(ROW.findall(README.read_text()))


def as_written(value: Any) -> str:
    """A default as the README writes it in backticks."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("NBIA_PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_the_secrets_without_a_flag_are_the_ones_the_code_leaves_out() -> None:
    assert set(_NO_FLAG) == SECRETS


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_the_readme_gives_each_settings_default(name: str) -> None:
    documented = readme_defaults().get(name)
    assert documented is not None, f"{name} is missing from the README settings table"
    if name in PROSE_DEFAULTS:
        assert documented == PROSE_DEFAULTS[name]
        return
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    assert documented == f"`{as_written(default)}`", (name, documented, default)


def samples(tmp_path: Path) -> dict[str, tuple[str, str, Any]]:
    """Per setting: its value as a flag or environment variable gives it, as a TOML file
    gives it, and the value the settings must then hold (never the default)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret-value-with-at-least-32-characters\n")
    secret.chmod(0o600)
    found: dict[str, tuple[str, str, Any]] = {}
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:
            found[name] = (str(not default).lower(), str(not default).lower(), not default)
        elif field.annotation is int:
            found[name] = (str(default + 1), str(default + 1), default + 1)
        elif field.annotation is float:
            value = default + 1.5
            found[name] = (str(value), str(value), value)
    text = {
        "host": "127.0.0.2",
        "upstream": "https://nbia.example.org",
        "nlst_upstream": "https://nlst.example.org",
        "username": "lab_account",
        "nlst_username": "nlst_account",
        "client_id": "other-client",
        "log_level": "debug",
        "audit_log": "-",
        "redis_url": "redis://127.0.0.1:6390/0",
        "redis_prefix": "lab-a:",
        "database_url": f"sqlite:///{tmp_path}/other.sqlite3",
    }
    for name, value in text.items():
        found[name] = (value, json.dumps(value), value)
    paths = ("password_file", "nlst_password_file", "token_secret_file", "metrics_token_file")
    for name in paths:
        found[name] = (str(secret), json.dumps(str(secret)), secret)
    for name in ("data_dir", "binary_dir"):
        found[name] = (str(tmp_path / name), json.dumps(str(tmp_path / name)), tmp_path / name)
    found["access"] = ("accounts", '"accounts"', "accounts")
    found["audit_format"] = ("combined", '"combined"', "combined")
    found["trusted_proxies"] = (
        "10.0.0.5,10.1.0.0/16",
        '["10.0.0.5", "10.1.0.0/16"]',
        ["10.0.0.5", "10.1.0.0/16"],
    )
    found["cache_ttl"] = (
        '{"v4/getSeries*": 3600}',
        '{ "v4/getSeries*" = 3600 }',
        {"v4/getSeries*": 3600.0},
    )
    found["workers"] = ("3", "3", 3)
    for name in SECRETS:
        found[name] = ("pw-from-source", '"pw-from-source"', "pw-from-source")
    # Needs a postgresql:// URL to put its password in (given by the same source).
    found["database_password_file"] = (str(secret), json.dumps(str(secret)), secret)
    return found


#: What a setting needs beside it to be valid, given by the same source.
COMPANIONS = {"database_password_file": {"database_url": "postgresql://lab@db.example.org/nbia"}}


def held(settings: Settings, name: str) -> Any:
    value = getattr(settings, name)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_each_setting_is_read_from_a_flag_the_environment_and_a_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag_value, toml_value, expected = samples(tmp_path)[name]
    assert expected != Settings.model_fields[name].get_default(call_default_factory=True)
    companions = COMPANIONS.get(name, {})

    def flag(setting: str) -> str:
        return "--" + setting.replace("_", "-")

    if name not in SECRETS:
        words = ["serve", flag(name), flag_value] if not isinstance(expected, bool) else []
        if isinstance(expected, bool):
            words = ["serve", flag(name) if expected else "--no-" + flag(name)[2:]]
        for other, value in companions.items():
            words += [flag(other), value]
        assert held(settings_from_args(build_parser().parse_args(words)), name) == expected

    with monkeypatch.context() as env:
        env.setenv(f"NBIA_PROXY_{name.upper()}", flag_value)
        for other, value in companions.items():
            env.setenv(f"NBIA_PROXY_{other.upper()}", value)
        assert held(settings_from_args(build_parser().parse_args(["serve"])), name) == expected

    lines = [f"{name} = {toml_value}"]
    lines += [f"{other} = {json.dumps(value)}" for other, value in companions.items()]
    config = tmp_path / "settings.toml"
    config.write_text("\n".join(lines) + "\n")
    words = ["serve", "--config", str(config)]
    assert held(settings_from_args(build_parser().parse_args(words)), name) == expected


def test_the_secrets_have_no_flag() -> None:
    parser = build_parser()
    for name in SECRETS:
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--" + name.replace("_", "-"), "x"])

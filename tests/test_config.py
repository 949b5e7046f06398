"""Settings: precedence flag > NBIA_PROXY_* environment > TOML file > default, the file forms,
the password file, clean errors from the command line, and a password that never shows."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

from proxy import cli
from proxy.cli import build_parser, settings_from_args
from proxy.config import Settings, load_settings

SECRET = "s3cret-Pa55word-never-shown"
NBIA = "https://services.cancerimagingarchive.net"  # the guide's base URL (seed L23)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No NBIA_PROXY_* variable from the outside, and a scratch working directory."""
    for name in list(os.environ):
        if name.upper().startswith("NBIA_PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main must never start a server here; if a bad value were accepted it would."""

    def refuse(settings: Settings) -> None:
        raise AssertionError("cli.main accepted the settings and tried to serve")

    monkeypatch.setattr(cli, "serve", refuse)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def from_flags(*flags: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_defaults_are_nbias_public_setup() -> None:
    """With no flag, variable or file: the public NBIA host, the guest account and client id
    (catalog §1.1, §1.3: nbia_guest, client_id nbia, 7200 s tokens), loopback port 8080."""
    settings = load_settings()
    assert settings.upstream == NBIA
    assert settings.nlst_upstream == "https://nlst.cancerimagingarchive.net"
    assert settings.username == "nbia_guest"
    assert settings.password.get_secret_value() == ""
    assert settings.client_id == "nbia"
    assert settings.client_token_lifetime_seconds == 7200
    assert settings.token_on_v4 is False
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)


# One value per layer; the strongest layer present must win.
LAYERS = ("flag", "env", "file")
PRECEDENCE_FIELDS = {
    # field: (flag args, env value, file line, value from flag, env, file, default)
    "port": (
        ["--port", "9003"],
        "9002",
        "port = 9001",
        (9003, 9002, 9001, 8080),
    ),
    "upstream": (
        ["--upstream", "http://flag.example"],
        "http://env.example",
        'upstream = "http://file.example"',
        ("http://flag.example", "http://env.example", "http://file.example", NBIA),
    ),
    "token_on_v4": (
        ["--token-on-v4"],
        "false",
        "token_on_v4 = true",
        (True, False, True, False),
    ),
    "read_timeout_seconds": (
        ["--read-timeout-seconds", "3.5"],
        "2.5",
        "read_timeout_seconds = 1.5",
        (3.5, 2.5, 1.5, 120.0),
    ),
}
COMBINATIONS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("field", sorted(PRECEDENCE_FIELDS))
@pytest.mark.parametrize(
    "present",
    COMBINATIONS,
    ids=[
        "+".join(n for n, on in zip(LAYERS, c, strict=True) if on) or "none" for c in COMBINATIONS
    ],
)
def test_precedence_flag_over_env_over_file_over_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str, present: tuple[bool, ...]
) -> None:
    """For every mix of sources, the strongest one given decides the value."""
    flag_args, env_value, file_line, values = PRECEDENCE_FIELDS[field]
    use_flag, use_env, use_file = present
    args = list(flag_args) if use_flag else []
    if use_env:
        monkeypatch.setenv(f"NBIA_PROXY_{field.upper()}", env_value)
    if use_file:
        args += ["--config", str(write(tmp_path / "settings.toml", file_line + "\n"))]
    settings = from_flags(*args)
    winner = next((i for i, on in enumerate(present) if on), 3)
    assert getattr(settings, field) == values[winner]


def test_environment_value_equal_to_the_default_still_beats_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A variable counts because it is set, not because it differs from the default."""
    monkeypatch.setenv("NBIA_PROXY_PORT", "8080")
    settings = load_settings(write(tmp_path / "s.toml", "port = 9001\n"))
    assert settings.port == 8080


def test_flag_equal_to_the_default_still_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flag counts because it was given, even with the default's value."""
    monkeypatch.setenv("NBIA_PROXY_PORT", "9002")
    assert from_flags("--port", "8080").port == 8080
    monkeypatch.setenv("NBIA_PROXY_TOKEN_ON_V4", "true")
    assert from_flags("--no-token-on-v4").token_on_v4 is False
    assert from_flags().token_on_v4 is True


def test_load_settings_ignores_flags_that_were_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """None stands for "flag not given" and does not hide the environment."""
    monkeypatch.setenv("NBIA_PROXY_HOST", "127.0.0.2")
    assert load_settings(None, host=None, port=None).host == "127.0.0.2"


def test_table_form_with_dashed_keys(tmp_path: Path) -> None:
    """A file may hold its settings under [nbia-proxy], with dashed or underscored keys."""
    config = write(
        tmp_path / "nbia.toml",
        "[nbia-proxy]\n"
        'nlst-upstream = "http://nlst.example:8000"\n'
        "client_token_lifetime_seconds = 600\n"
        'data-dir = "cache-here"\n'
        "token-on-v4 = true\n",
    )
    settings = load_settings(config)
    assert settings.nlst_upstream == "http://nlst.example:8000"
    assert settings.client_token_lifetime_seconds == 600
    assert settings.data_dir == Path("cache-here")
    assert settings.token_on_v4 is True


def test_flat_and_table_forms_agree(tmp_path: Path) -> None:
    """The same keys give the same settings with or without the [nbia-proxy] table."""
    lines = 'port = 9100\nusername = "someone"\n'
    flat = load_settings(write(tmp_path / "flat.toml", lines))
    table = load_settings(write(tmp_path / "table.toml", "[nbia-proxy]\n" + lines))
    assert (flat.port, flat.username) == (table.port, table.username) == (9100, "someone")


def test_config_file_named_by_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NBIA_PROXY_CONFIG names the file when --config is absent; --config wins over it."""
    monkeypatch.setenv("NBIA_PROXY_CONFIG", str(write(tmp_path / "env.toml", "port = 9201\n")))
    assert from_flags().port == 9201
    other = write(tmp_path / "flag.toml", "port = 9202\n")
    assert from_flags("--config", str(other)).port == 9202


def test_upstream_trailing_slash_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream base URLs are kept without a trailing slash, whatever the source."""
    monkeypatch.setenv("NBIA_PROXY_UPSTREAM", "http://env.example:8000/")
    assert load_settings().upstream == "http://env.example:8000"


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """NBIA_PROXY_PASSWORD sets the service account password."""
    monkeypatch.setenv("NBIA_PROXY_PASSWORD", SECRET)
    assert load_settings().password.get_secret_value() == SECRET


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_password_file_is_read_and_wins_over_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    """password_file (from any source) supplies the password, minus the final newline, and
    wins over a plain password."""
    secret_file = write(tmp_path / "password.txt", SECRET + "\n")
    monkeypatch.setenv("NBIA_PROXY_PASSWORD", "the-weaker-one")
    args: list[str] = []
    if source == "flag":
        args = ["--password-file", str(secret_file)]
    elif source == "env":
        monkeypatch.setenv("NBIA_PROXY_PASSWORD_FILE", str(secret_file))
    else:
        config = write(tmp_path / "s.toml", f'password_file = "{secret_file}"\n')
        args = ["--config", str(config)]
    assert from_flags(*args).password.get_secret_value() == SECRET


def test_password_file_keeps_inner_whitespace(tmp_path: Path) -> None:
    """Only the line ending is stripped: spaces are part of the password."""
    secret_file = write(tmp_path / "password.txt", " a b \r\n")
    settings = load_settings(None, password_file=secret_file)
    assert settings.password.get_secret_value() == " a b "


def test_nlst_password_file_is_read_and_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """nlst_password_file supplies the NLST password (a container secret), minus the final
    newline, and wins over a plain nlst_password."""
    secret_file = write(tmp_path / "nlst.txt", SECRET + "\n")
    monkeypatch.setenv("NBIA_PROXY_NLST_PASSWORD", "the-weaker-one")
    monkeypatch.setenv("NBIA_PROXY_NLST_PASSWORD_FILE", str(secret_file))
    nlst = load_settings().nlst_password
    assert nlst is not None and nlst.get_secret_value() == SECRET


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_database_password_file_goes_into_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str
) -> None:
    """database_password_file puts the password into database_url, quoted where a URL needs
    it, winning over one already in the URL: the URL of a compose file then holds none."""
    from sqlalchemy.engine import make_url

    password = "p@ss:w/rd%1"
    secret_file = write(tmp_path / "db.txt", password + "\n")
    monkeypatch.setenv("NBIA_PROXY_DATABASE_URL", f"{scheme}://nbia:old@db:5432/nbia_proxy")
    monkeypatch.setenv("NBIA_PROXY_DATABASE_PASSWORD_FILE", str(secret_file))
    url = make_url(load_settings().database_url or "")
    assert (url.username, url.password, url.host, url.port) == ("nbia", password, "db", 5432)
    assert url.database == "nbia_proxy"


@pytest.mark.parametrize("database_url", [None, "sqlite:///x.sqlite3"])
def test_database_password_file_needs_postgresql(
    tmp_path: Path, database_url: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a PostgreSQL URL to put it in, the password file is a usage error naming it."""
    secret_file = write(tmp_path / "db.txt", SECRET)
    flags = ["--database-password-file", str(secret_file)]
    if database_url:
        flags += ["--database-url", database_url]
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert "database_password_file" in err and "postgresql" in err
    assert SECRET not in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["serve", "migrate"])
@pytest.mark.parametrize(
    "database_url", ["postgresql://nbia:S3CRET@db:notaport/nbia", "postgresql://nbia:S3CRET@db:/x"]
)
def test_a_database_url_that_does_not_parse_is_a_usage_error_without_its_password(
    tmp_path: Path, command: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a stack trace at start-up (which named no setting), and never the password."""
    flags = ["--database-url", database_url, "--data-dir", str(tmp_path)]
    assert cli.main([command, *flags]) == 2
    out, err = capsys.readouterr()
    assert "database_url" in err and "not a database URL" in err, err
    assert "S3CRET" not in out + err and "Traceback" not in err


@pytest.mark.parametrize("name", ["nlst_password_file", "database_password_file"])
def test_unreadable_secret_file_is_named(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret file that cannot be read is one line naming the setting and the file."""
    flags = ["--" + name.replace("_", "-"), str(tmp_path / "nowhere.txt")]
    flags += ["--database-url", "postgresql://nbia@db/nbia"]
    assert cli.main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert name in err and "nowhere.txt" in err and "Traceback" not in err


def test_workers_get_the_secrets_not_the_files(tmp_path: Path) -> None:
    """serve --workers N hands each worker the secrets read from the files (and not the files,
    which need not be readable twice): a worker's settings equal the parent's."""
    db_file = write(tmp_path / "db.txt", SECRET + "-db")
    nlst_file = write(tmp_path / "nlst.txt", SECRET + "-nlst")
    settings = load_settings(
        None,
        database_url="postgresql://nbia@db/nbia",
        database_password_file=db_file,
        nlst_password_file=nlst_file,
    )
    db_file.unlink()
    nlst_file.unlink()
    worker = Settings(**cli._plain(settings))
    assert worker.database_url == settings.database_url
    assert worker.nlst_password is not None
    assert worker.nlst_password.get_secret_value() == SECRET + "-nlst"


def test_password_never_shows(tmp_path: Path) -> None:
    """repr(), str() and JSON dumps of the settings mask both passwords, however given."""
    secret_file = write(tmp_path / "password.txt", SECRET + "-file\n")
    for settings in (
        Settings(password=SECRET, nlst_password=SECRET + "-nlst"),
        load_settings(None, password_file=secret_file),
    ):
        for text in (repr(settings), str(settings), settings.model_dump_json()):
            assert SECRET not in text


def test_there_is_no_password_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """Passwords never come from the command line (ps would show them): no --password or
    --nlst-password in the help, and neither is accepted, not even as an abbreviation of
    another flag (argparse accepts unambiguous prefixes, e.g. of --password-file)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--config" in help_text  # the help was really captured
    assert not re.search(r"--(nlst-)?password(?![-\w])", help_text)
    for flag in ("--password", "--nlst-password", "--pass"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["serve", flag, SECRET])
        assert exited.value.code == 2


def _bad_file(tmp_path: Path, text: str) -> list[str]:
    return ["--config", str(write(tmp_path / "bad.toml", text))]


INVALID = {
    "port out of range (flag)": lambda p: ["--port", "70000"],
    "port not a number (flag)": lambda p: ["--port", "eighty"],
    "upstream without scheme (flag)": lambda p: ["--upstream", "services.example"],
    "negative timeout (flag)": lambda p: ["--connect-timeout-seconds", "-1"],
    "port out of range (file)": lambda p: _bad_file(p, "port = -5\n"),
    "unknown key (file)": lambda p: _bad_file(p, "prot = 8080\n"),
    "not TOML (file)": lambda p: _bad_file(p, "port = = 1\n"),
    "table is not a table (file)": lambda p: _bad_file(p, 'nbia-proxy = "x"\n'),
    "missing config file": lambda p: ["--config", str(p / "nowhere.toml")],
    "missing password file": lambda p: ["--password-file", str(p / "nowhere.txt")],
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_value_gives_one_clean_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """cli.main returns 2 and prints one line to stderr, without a traceback."""
    assert cli.main(INVALID[name](tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nbia-proxy:")
    assert "Traceback" not in err


def test_invalid_environment_value_gives_one_clean_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad NBIA_PROXY_* value is reported like a bad flag, naming the setting."""
    monkeypatch.setenv("NBIA_PROXY_UPSTREAM", "ftp://services.example")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "upstream" in err and "Traceback" not in err


def test_errors_do_not_echo_a_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unquoted numeric password in the file is invalid; the error names the setting but
    does not print the value."""
    assert cli.main(_bad_file(tmp_path, "password = 31415926535\n")) == 2
    err = capsys.readouterr().err
    assert "password" in err
    assert "31415926535" not in err


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "gateway.lab"])
def test_open_mode_refuses_a_non_loopback_host_unless_told(
    host: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without lab accounts anyone who can reach the gateway uses the service account."""

    def must_not_serve(settings: Settings) -> None:
        raise AssertionError("the gateway would have started")

    monkeypatch.setattr(cli, "serve", must_not_serve)
    assert cli.main(["serve", "--host", host]) == 2
    assert "allow_remote_open" in capsys.readouterr().err
    assert load_settings(None, host=host, allow_remote_open=True).host == host
    assert load_settings(None, host=host, access="accounts").host == host  # accounts protect it


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_permission(host: str) -> None:
    assert load_settings(None, host=host).host == host

"""Fail safe for people: every setting or environment a user can get wrong ends in one line on
stderr saying what to do (exit 2 for usage errors, 1 for runtime failures), never a traceback;
a typo never purges the whole cache; an upstream URL that cannot be NBIA's base is refused.

The command-line cases run ``python -m proxy`` in a subprocess, as a user would, with no
``NBIA_PROXY_*`` variable from the outside. Permission cases need file modes to apply: when the
tests run as root, the child drops root's permission override (``CAP_DAC_OVERRIDE``) first.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from proxy.accounts.registry import Registry
from proxy.config import InvalidSettings, load_settings
from proxy.db import SQLITE_FILE, database_url, make_engine, migrate
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, free_port, make_settings, request_line, send_raw

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "hunter2-never-shown"
S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
COLLECTIONS = f"{S}/v4/getCollectionValues"
STATS = "/_proxy/cache/stats"
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _without_root_override() -> None:
    """Run in the child before exec: root loses the capabilities that ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@dataclass
class Run:
    status: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.strip().splitlines()


def run_cli(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    unprivileged: bool = False,
    timeout: float = 60,
) -> Run:
    """``python -m proxy ARGS`` as a user runs it; a command that starts serving fails here."""
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("NBIA_PROXY_")}
    environment["PYTHONPATH"] = str(ROOT)
    environment.update(env or {})
    preexec = _without_root_override if unprivileged and os.geteuid() == 0 else None
    try:
        done = subprocess.run(
            [sys.executable, "-m", "proxy", *args],
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=preexec,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"nbia-proxy {' '.join(args)} accepted the mistake and kept running")
    return Run(done.returncode, done.stdout, done.stderr)


def assert_one_line(run: Run, status: int, *words: str) -> str:
    """Exactly one ``nbia-proxy:`` line on stderr, nothing on stdout, the expected status."""
    assert "Traceback" not in run.err, run.err
    assert len(run.lines) == 1, run.err
    line = run.lines[0]
    assert line.startswith("nbia-proxy: "), line
    assert run.status == status, (run.status, line)
    assert run.out == "", run.out
    for word in words:
        assert word in line, (word, line)
    for noise in ("Value error,", "invalid setting settings", "Errno", "sqlalche.me", PASSWORD):
        assert noise not in line, (noise, line)
    return line


# --- the mistakes -------------------------------------------------------------------------------


@dataclass
class Mistake:
    """A command line (``{tmp}`` stands for a scratch dir) and what its one line must say."""

    args: tuple[str, ...]
    status: int
    words: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    unprivileged: bool = False
    setup: Callable[[Path], None] | None = None


def _file(tmp: Path) -> None:
    (tmp / "a-file").write_text("not a directory\n")


def _read_only_dir(tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def _read_only_database(tmp: Path) -> None:
    data = tmp / "rodb"
    migrate(database_url(None, data))
    for path in data.iterdir():
        path.chmod(0o444)
    data.chmod(0o555)


def _toml(text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / "settings.toml").write_text(text)

    return write


SERVE = ("serve", "--port", "0", "--log-level", "warning")
DATA = ("--data-dir", "{tmp}/data")
PG_DOWN = f"postgresql://nobody:{PASSWORD}@127.0.0.1:1/db"

MISTAKES: dict[str, Mistake] = {
    "data dir is a file": Mistake(
        (*SERVE, "--data-dir", "{tmp}/a-file"), 2, ("data_dir", "not a directory"), setup=_file
    ),
    "data dir below a file": Mistake(
        (*SERVE, "--data-dir", "{tmp}/a-file/sub"), 2, ("data_dir", "not a directory"), setup=_file
    ),
    "data dir with a missing parent": Mistake(
        (*SERVE, "--data-dir", "{tmp}/nonexistent/x/y"), 2, ("data_dir", "does not exist")
    ),
    "data dir read-only (serve)": Mistake(
        (*SERVE, "--data-dir", "{tmp}/ro"),
        2,
        ("data_dir", "not writable"),
        unprivileged=True,
        setup=_read_only_dir,
    ),
    "data dir read-only (migrate)": Mistake(
        ("migrate", "--data-dir", "{tmp}/ro"),
        2,
        ("not writable",),
        unprivileged=True,
        setup=_read_only_dir,
    ),
    "database url not a url": Mistake(
        (*SERVE, *DATA, "--database-url", "foo"), 2, ("database_url", "sqlite", "postgresql")
    ),
    "database url mysql": Mistake(
        (*SERVE, *DATA, "--database-url", "mysql://x/y"),
        2,
        ("database_url", "mysql", "sqlite", "postgresql", "psycopg"),
    ),
    "postgresql unreachable (serve)": Mistake(
        (*SERVE, *DATA, "--database-url", PG_DOWN), 1, ("PostgreSQL", "127.0.0.1:1", "refused")
    ),
    "postgresql unreachable (migrate)": Mistake(
        ("migrate", *DATA, "--database-url", PG_DOWN), 1, ("PostgreSQL", "127.0.0.1:1")
    ),
    "postgresql unreachable (users add)": Mistake(
        ("users", "add", "x", *DATA, "--database-url", PG_DOWN), 1, ("PostgreSQL", "127.0.0.1:1")
    ),
    "log level unknown": Mistake(
        (*SERVE[:3], *DATA, "--log-level", "loud"), 2, ("log_level", "debug", "info", "warning")
    ),
    "config file not TOML": Mistake(
        (*SERVE, *DATA, "--config", "{tmp}/settings.toml"),
        2,
        ("{tmp}/settings.toml", "TOML", "line 1"),
        setup=_toml("port = = 1\n"),
    ),
    "config file with an unknown key": Mistake(
        (*SERVE, *DATA, "--config", "{tmp}/settings.toml"),
        2,
        ("{tmp}/settings.toml", "prot", "port"),
        setup=_toml("prot = 8080\n"),
    ),
    "config file missing": Mistake(
        (*SERVE, *DATA, "--config", "{tmp}/nowhere.toml"),
        2,
        ("{tmp}/nowhere.toml", "does not exist"),
    ),
    "config value wrong": Mistake(
        (*SERVE, *DATA, "--config", "{tmp}/settings.toml"),
        2,
        ("read_timeout_seconds", "{tmp}/settings.toml", "greater than 0"),
        setup=_toml("read_timeout_seconds = -1\n"),
    ),
    "environment value wrong": Mistake(
        (*SERVE, *DATA),
        2,
        ("read_timeout_seconds", "NBIA_PROXY_READ_TIMEOUT_SECONDS", "number"),
        env={"NBIA_PROXY_READ_TIMEOUT_SECONDS": "soon"},
    ),
    "environment value not JSON": Mistake(
        (*SERVE, *DATA),
        2,
        ("cache_ttl", "NBIA_PROXY_CACHE_TTL", "JSON"),
        env={"NBIA_PROXY_CACHE_TTL": "notjson"},
    ),
    "password file missing": Mistake(
        (*SERVE, *DATA, "--password-file", "{tmp}/nowhere.txt"),
        2,
        ("password_file", "{tmp}/nowhere.txt"),
    ),
    "upstream with /nbia-api": Mistake(
        (*SERVE, *DATA, "--upstream", "http://127.0.0.1:9/nbia-api"),
        2,
        ("upstream", "without /nbia-api", "https://services.cancerimagingarchive.net"),
    ),
    "upstream with the services path": Mistake(
        (
            *SERVE,
            *DATA,
            "--upstream",
            "https://services.cancerimagingarchive.net/nbia-api/services/v4",
        ),
        2,
        ("upstream", "without /nbia-api"),
    ),
    "nlst upstream with /nbia-api/": Mistake(
        (*SERVE, *DATA, "--nlst-upstream", "https://nlst.cancerimagingarchive.net/nbia-api/"),
        2,
        ("nlst_upstream", "https://nlst.cancerimagingarchive.net"),
    ),
    "upstream with a query": Mistake(
        (*SERVE, *DATA, "--upstream", "http://127.0.0.1:9/?x=1"), 2, ("upstream", "query")
    ),
    "upstream without scheme": Mistake(
        (*SERVE, *DATA, "--upstream", "services.example"), 2, ("upstream", "http")
    ),
    "open mode on a remote host": Mistake(
        (*SERVE, *DATA, "--host", "0.0.0.0"), 2, ("allow_remote_open", "access")
    ),
    "flag value not JSON": Mistake(
        (*SERVE, *DATA, "--cache-ttl", "notjson"), 2, ("--cache-ttl", "JSON")
    ),
    "flag unknown": Mistake((*SERVE, *DATA, "--prot", "1"), 2, ("--prot",)),
    "subcommand missing": Mistake(("cache",), 2, ("stats", "purge")),
    "host that does not resolve": Mistake(
        ("serve", "--port", "0", *DATA, "--host", "nowhere.invalid", "--allow-remote-open"),
        2,
        ("nowhere.invalid",),
    ),
    "host of another machine": Mistake(
        ("serve", "--port", "0", *DATA, "--host", "192.0.2.1", "--allow-remote-open"),
        2,
        ("192.0.2.1", "address of this machine"),
    ),
    "stats from a port with nothing listening": Mistake(
        ("cache", "stats", "--from", "http://127.0.0.1:{free_port}"),
        1,
        ("http://127.0.0.1:{free_port}", "refused"),
    ),
    "stats from a malformed url": Mistake(
        ("cache", "stats", "--from", "notaurl"), 2, ("--from", "http://")
    ),
    "stats from a url with a path": Mistake(
        ("cache", "stats", "--from", "http://127.0.0.1:8080/nbia-api"), 2, ("--from", "base URL")
    ),
    "stats on a read-only database": Mistake(
        ("cache", "stats", "--data-dir", "{tmp}/rodb"),
        2,
        ("read-only", SQLITE_FILE),
        unprivileged=True,
        setup=_read_only_database,
    ),
    "users add on a read-only database": Mistake(
        ("users", "add", "x", "--data-dir", "{tmp}/rodb"),
        2,
        ("read-only", SQLITE_FILE),
        unprivileged=True,
        setup=_read_only_database,
    ),
    "purge without a filter": Mistake(("cache", "purge", *DATA), 2, ("--all", "--collection")),
    "purge with an empty filter": Mistake(
        ("cache", "purge", *DATA, "--collection", ""), 2, ("--collection", "empty")
    ),
    "purge all with a filter": Mistake(
        ("cache", "purge", *DATA, "--all", "--series", "1.2.3"), 2, ("--all",)
    ),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_a_mistake_is_one_line_that_says_what_to_do(tmp_path: Path, name: str) -> None:
    mistake = MISTAKES[name]
    if mistake.setup is not None:
        mistake.setup(tmp_path)
    port = str(free_port())

    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{free_port}", port)

    run = run_cli(
        *(fill(a) for a in mistake.args),
        cwd=tmp_path,
        env=mistake.env,
        unprivileged=mistake.unprivileged,
    )
    assert_one_line(run, mistake.status, *(fill(w) for w in mistake.words))


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """Before migrations or uvicorn's log lines: the port is taken, exit 1 (free it, retry)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        run = run_cli("serve", "--port", port, "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert_one_line(run, 1, f"port {port}", "in use")
    assert not (tmp_path / "d").exists()


def test_a_read_only_database_is_left_as_it_was(tmp_path: Path) -> None:
    """The refused ``users add`` wrote nothing: the file's bytes are unchanged."""
    _read_only_database(tmp_path)
    database = tmp_path / "rodb" / SQLITE_FILE
    before = database.read_bytes()
    run = run_cli("users", "add", "x", "--data-dir", str(tmp_path / "rodb"), cwd=tmp_path,
                  unprivileged=True)  # fmt: skip
    assert run.status == 2
    assert database.read_bytes() == before


def test_a_missing_parent_is_not_created(tmp_path: Path) -> None:
    """A typo in the data dir's parent does not grow a new tree with an empty cache."""
    run_cli(*SERVE, "--data-dir", str(tmp_path / "nonexistent" / "x" / "y"), cwd=tmp_path)
    assert not (tmp_path / "nonexistent").exists()


def test_an_unknown_environment_variable_is_warned_about(tmp_path: Path) -> None:
    """A misspelt NBIA_PROXY_* variable is one warning line naming the likely setting; the
    command still runs (the environment may hold variables for other versions)."""
    run = run_cli(
        "migrate", "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
        env={"NBIA_PROXY_PORTT": "1"},
    )  # fmt: skip
    assert run.status == 0, run.err
    assert len(run.lines) == 1, run.err
    assert run.lines[0].startswith("nbia-proxy: warning: ")
    assert "NBIA_PROXY_PORTT" in run.lines[0] and "did you mean NBIA_PROXY_PORT?" in run.lines[0]
    assert "up to date" in run.out


def test_known_environment_variables_give_no_warning(tmp_path: Path) -> None:
    settings_file = tmp_path / "s.toml"
    settings_file.write_text("port = 9000\n")
    run = run_cli(
        "migrate", cwd=tmp_path,
        env={"NBIA_PROXY_DATA_DIR": str(tmp_path / "d"), "NBIA_PROXY_CONFIG": str(settings_file)},
    )  # fmt: skip
    assert (run.status, run.err) == (0, "")


def test_a_password_in_the_database_url_is_never_shown(tmp_path: Path) -> None:
    """Malformed or unreachable: the line never holds the URL's password."""
    for url in (PG_DOWN, f"mysql://root:{PASSWORD}@db/x", f"postgresql://u:{PASSWORD}@"):
        run = run_cli("migrate", "--data-dir", str(tmp_path), "--database-url", url, cwd=tmp_path)
        assert PASSWORD not in run.err
        assert run.status in (1, 2) and len(run.lines) == 1, run.err


# --- settings values, checked where they are defined --------------------------------------------


@pytest.fixture
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("NBIA_PROXY_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_environment")
@pytest.mark.parametrize(
    "url",
    [
        "http://host/nbia-api",
        "http://host/nbia-api/",
        "https://host/nbia-api/services/v4",
        "https://host/NBIA-API/services",
        "https://host/services/v4/",
        "https://host/nbia-api/oauth/token",
        "http://host/?a=b",
        "http://host/#top",
        "http://user:pw@host",
        "http://",
        "http:///nbia-api",
    ],
)
def test_an_upstream_that_cannot_be_a_base_url_is_refused(url: str) -> None:
    for name in ("upstream", "nlst_upstream"):
        with pytest.raises(InvalidSettings) as refused:
            load_settings(None, **{name: url})
        assert len(refused.value.lines) == 1
        assert refused.value.lines[0].startswith(f"invalid setting {name}: ")
        assert "pw" not in refused.value.lines[0].replace("upstream", "")


@pytest.mark.usefixtures("no_environment")
@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("https://services.cancerimagingarchive.net/", "https://services.cancerimagingarchive.net"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        # Another gateway's NLST mount, or NBIA behind a reverse proxy under a prefix.
        ("http://gateway.lab:8080/nlst/", "http://gateway.lab:8080/nlst"),
    ],
)
def test_a_base_url_is_accepted(given: str, kept: str) -> None:
    assert load_settings(None, upstream=given, nlst_upstream=given).upstream == kept


@pytest.mark.usefixtures("no_environment")
def test_log_levels_are_checked_and_case_does_not_matter() -> None:
    assert load_settings(None, log_level="WARNING").log_level == "warning"
    with pytest.raises(InvalidSettings) as refused:
        load_settings(None, log_level="loud")
    assert "debug, info, warning, error" in refused.value.lines[0]


@pytest.mark.usefixtures("no_environment")
@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///relative.sqlite3",
        "sqlite:////abs/olute.sqlite3",
        "postgresql://user@host/db",
        "postgres://user@host:5433/db",
        "postgresql+psycopg://user@host/db?options=-csearch_path%3Dx",
    ],
)
def test_supported_database_urls_are_accepted(url: str) -> None:
    assert load_settings(None, database_url=url).database_url == url


@pytest.mark.usefixtures("no_environment")
@pytest.mark.parametrize(
    "url", ["foo", "mysql://x/y", "postgresql+psycopg2://u@h/d", "oracle://h/d", "://", "sqlite"]
)
def test_unsupported_database_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidSettings) as refused:
        load_settings(None, database_url=url)
    assert "sqlite:///" in refused.value.lines[0] and "postgresql://" in refused.value.lines[0]


# --- cache stats --from a gateway in accounts mode ----------------------------------------------


@pytest.fixture
def accounts_gateway(
    tmp_path: Path, nbia_upstream: FakeServer, nlst_upstream: FakeServer
) -> Iterator[tuple[GatewayServer, dict[str, str]]]:
    data_dir = tmp_path / "lab"
    migrate(database_url(None, data_dir))
    engine = make_engine(database_url(None, data_dir))
    registry = Registry(engine)
    keys = {"root": registry.add("root", admin=True), "alice": registry.add("alice")}
    engine.dispose()
    settings = make_settings(data_dir, nbia_upstream.url, nlst_upstream.url, access="accounts")
    with GatewayServer(settings) as server:
        yield server, keys


def test_stats_from_an_accounts_gateway_asks_for_an_admin_key(
    tmp_path: Path, accounts_gateway: tuple[GatewayServer, dict[str, str]]
) -> None:
    server, keys = accounts_gateway
    run = run_cli("cache", "stats", "--from", server.url, cwd=tmp_path)
    assert_one_line(run, 2, "NBIA_PROXY_ADMIN_KEY", "--key-file")


@pytest.mark.parametrize("how", ["environment", "file"])
def test_stats_from_an_accounts_gateway_with_an_admin_key(
    tmp_path: Path, accounts_gateway: tuple[GatewayServer, dict[str, str]], how: str
) -> None:
    server, keys = accounts_gateway
    if how == "environment":
        run = run_cli("cache", "stats", "--from", server.url, cwd=tmp_path,
                      env={"NBIA_PROXY_ADMIN_KEY": keys["root"]})  # fmt: skip
    else:
        (tmp_path / "admin.key").write_text(keys["root"] + "\n")
        (tmp_path / "admin.key").chmod(0o600)  # else warned about: others could read it
        run = run_cli("cache", "stats", "--from", server.url, "--key-file",
                      str(tmp_path / "admin.key"), cwd=tmp_path)  # fmt: skip
    assert (run.status, run.err) == (0, "")
    assert json.loads(run.out)["access"]["mode"] == "accounts"


@pytest.mark.parametrize(("who", "words"), [("alice", ("admin",)), ("wrong", ("refused",))])
def test_stats_from_an_accounts_gateway_with_a_key_it_refuses(
    tmp_path: Path,
    accounts_gateway: tuple[GatewayServer, dict[str, str]],
    who: str,
    words: tuple[str, ...],
) -> None:
    server, keys = accounts_gateway
    key = keys.get(who, PASSWORD)
    run = run_cli("cache", "stats", "--from", server.url, cwd=tmp_path,
                  env={"NBIA_PROXY_ADMIN_KEY": key})  # fmt: skip
    line = assert_one_line(run, 2, *words)
    assert key not in line


def test_the_admin_key_is_no_flag() -> None:
    """Like passwords, the key never comes from the command line (ps would show it)."""
    from proxy.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["cache", "stats", "--admin-key", "x"])


# --- purging over HTTP: a typo never purges everything ------------------------------------------


@pytest.fixture
def warm(gateway: GatewayServer) -> GatewayServer:
    """A gateway with two cached entries, written to the database."""
    for path in (SERIES, COLLECTIONS):
        assert httpx.get(gateway.url + path).headers["x-cache"] == "MISS"
    wait_stored(gateway, 2)
    return gateway


def entries(gateway: GatewayServer) -> int:
    return int(httpx.get(gateway.url + STATS).json()["entries"])


def wait_stored(gateway: GatewayServer, count: int) -> None:
    assert gateway.app.cache is not None
    gateway.app.cache.writer.flush()
    assert entries(gateway) == count


def purge(gateway: GatewayServer, query: str) -> tuple[int, dict[str, object]]:
    status, _, body = send_raw(gateway.url, request_line("DELETE", "/_proxy/cache" + query))
    return status, json.loads(body)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("?colection=X", ("colection", "path, collection, series, all")),
        ("?collection=", ("collection", "empty")),
        ("?path=", ("path", "empty")),
        ("?series", ("series", "empty")),
        ("?collection=4D-Lung&collection=TCGA-KIRC", ("collection", "once")),
        ("?all=yes", ("all", "true")),
        ("?all=true&collection=TCGA-KIRC", ("all",)),
        ("?all=", ("all",)),
        ("?Collection=TCGA-KIRC", ("Collection",)),
    ],
)
def test_a_purge_with_a_mistake_is_refused_and_deletes_nothing(
    warm: GatewayServer, query: str, words: tuple[str, ...]
) -> None:
    status, body = purge(warm, query)
    assert status == 400
    assert set(body) == {"error"}
    for word in words:
        assert word in str(body["error"]), body
    assert entries(warm) == 2
    for path in (SERIES, COLLECTIONS):
        assert httpx.get(warm.url + path).headers["x-cache"] == "HIT"


@pytest.mark.parametrize("query", ["", "?all=true"])
def test_purging_everything_takes_no_parameter_or_all_true(warm: GatewayServer, query: str) -> None:
    status, body = purge(warm, query)
    assert (status, body["purged_entries"]) == (200, 2)
    assert entries(warm) == 0


def test_a_filtered_purge_deletes_only_its_entries(warm: GatewayServer) -> None:
    status, body = purge(warm, "?collection=TCGA-KIRC")
    assert (status, body["purged_entries"]) == (200, 1)
    assert httpx.get(warm.url + COLLECTIONS).headers["x-cache"] == "HIT"


# --- purging from the command line ----------------------------------------------------------


def test_cli_purge_needs_a_filter_or_all(tmp_path: Path, warm: GatewayServer) -> None:
    """``cache purge`` alone is refused; ``--all`` empties the cache."""
    data = str(warm.settings.data_dir)
    refused = run_cli("cache", "purge", "--data-dir", data, cwd=tmp_path)
    assert_one_line(refused, 2, "--all")
    assert entries(warm) == 2
    done = run_cli("cache", "purge", "--all", "--data-dir", data, cwd=tmp_path)
    assert (done.status, done.err) == (0, "")
    assert json.loads(done.out)["purged_entries"] == 2
    with sqlite3.connect(warm.settings.data_dir / SQLITE_FILE) as db:
        assert db.execute("SELECT count(*) FROM cache_entries").fetchone() == (0,)

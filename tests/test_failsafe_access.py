"""Fail safe, access side (issue 8, items 3, 4 and 8).

- The data dir, the SQLite database and its side files are readable by the service user alone,
  as created and after a start that found them open to others; the signing secret can be kept
  out of the database altogether (``token_secret_file``).
- A gateway token is good only for the mode and the deployment that issued it: an open-mode
  gateway hands anyone a token for any name, and an accounts gateway on the same database must
  not take it.
- A locked-out address still gets in with a valid credential; only its further failures are
  refused (429) and counted, so one client behind a NAT cannot lock out the others.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from proxy.accounts.tables import GatewaySecret
from proxy.cli import main as cli_main
from proxy.client_tokens import ClientTokens, signing_key
from proxy.config import Settings
from proxy.db import SQLITE_FILE, database_url, make_engine
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayProcess, GatewayServer, make_settings, send_raw

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
TOKEN = "/nbia-api/oauth/token"
LOGOUT = "/nbia-api/logout"
STATS = "/_proxy/cache/stats"
FORM = "application/x-www-form-urlencoded"
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "nbia-proxy.service"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def others_can_read(path: Path) -> bool:
    """Whether anyone but the owner has any access to ``path`` (group or other bits set)."""
    return bool(mode_of(path) & 0o077)


def sqlite_files(data_dir: Path) -> list[Path]:
    """The database and whichever of its side files exist."""
    database = data_dir / SQLITE_FILE
    side = [Path(f"{database}{suffix}") for suffix in ("-wal", "-shm", "-journal")]
    return [database, *(path for path in side if path.exists())]


def modes(data_dir: Path) -> dict[str, int]:
    """The modes of the data dir and of the database files in it, right now."""
    found = {path.name: mode_of(path) for path in sqlite_files(data_dir)}
    return {"data dir": mode_of(data_dir)} | found


def add_user(
    data_dir: Path,
    name: str,
    capsys: pytest.CaptureFixture[str],
    *flags: str,
    url: str | None = None,
) -> str:
    """``nbia-proxy users add`` (on ``url`` when given); the printed key."""
    database = ["--database-url", url] if url else []
    code = cli_main(["users", "add", name, *flags, "--data-dir", str(data_dir), *database])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()[-1]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def basic(name: str, key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{key}".encode()).decode()}


def login_form(name: str, key: str) -> str:
    return f"grant_type=password&username={name}&password={key}&client_id=nbia"


def raw_get(url: str, target: str, authorization: str | None) -> tuple[int, bytes, bytes]:
    """A GET written by hand, with the Authorization header as given."""
    extra = f"Authorization: {authorization}\r\n" if authorization is not None else ""
    head = f"GET {target} HTTP/1.1\r\nHost: gateway\r\n{extra}Connection: close\r\n\r\n"
    return send_raw(url, head.encode())


def raw_login(url: str, name: str, key: str) -> tuple[int, bytes, bytes]:
    body = login_form(name, key).encode()
    head = (
        f"POST {TOKEN} HTTP/1.1\r\nHost: gateway\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return send_raw(url, head + body)


def post_form(url: str, form: str) -> httpx.Response:
    return httpx.post(url, content=form, headers={"Content-Type": FORM})


def retry_after(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"retry-after":
            return int(value)
    raise AssertionError("no Retry-After header")


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which SQLite made world-readable files."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def accounts_settings(data_dir: Path, upstream: FakeServer, **extra: Any) -> Settings:
    return make_settings(
        data_dir, upstream.url, access="accounts", accounts_refresh_seconds=0.2, **extra
    )


def secret_file(path: Path, text: str = "s3cret-" + "x" * 40) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


# --- item 3: who can read the data dir, the database and the secret -----------------------------


@pytest.mark.parametrize("how", ["gateway", "process", "cli"])
def test_a_fresh_data_dir_and_its_database_are_private(
    how: str,
    tmp_path: Path,
    nbia_upstream: FakeServer,
    umask_022: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Created by a gateway (the lifespan), by `nbia-proxy serve` (a process) or by a users
    command: the data dir is 0700, the database and its WAL and shared-memory files 0600."""
    data_dir = tmp_path / "data"
    if how == "cli":
        add_user(data_dir, "alice", capsys)
        # A reader of the database holds it open: SQLite keeps the WAL and -shm files then.
        reader = sqlite3.connect(data_dir / SQLITE_FILE)
        reader.execute("PRAGMA journal_mode=WAL")
        reader.execute("SELECT count(*) FROM lab_users").fetchall()
        found = modes(data_dir)
        reader.close()
    elif how == "gateway":
        with GatewayServer(make_settings(data_dir, nbia_upstream.url)) as gw:
            assert httpx.get(gw.url + SERIES).status_code == 200
            assert httpx.get(gw.url + SERIES).headers["x-cache"] == "HIT"  # written through
            found = modes(data_dir)
    else:
        with GatewayProcess(nbia_upstream.url, data_dir) as process:
            assert httpx.get(process.url + SERIES).status_code == 200
            found = modes(data_dir)
    assert found == {
        "data dir": 0o700,
        SQLITE_FILE: 0o600,
        SQLITE_FILE + "-wal": 0o600,
        SQLITE_FILE + "-shm": 0o600,
    }


def test_open_files_left_by_an_older_version_are_fixed_at_start_with_a_warning(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A data dir 0755 with a database, WAL and -shm 0644 (what the landed gateway made): the
    next start makes them private and warns once per file it changed; the start after that is
    silent."""
    data_dir = tmp_path / "data"
    key = add_user(data_dir, "alice", capsys)
    database = data_dir / SQLITE_FILE
    data_dir.chmod(0o755)
    database.chmod(0o644)
    holder = sqlite3.connect(database)  # keeps a WAL and -shm around, made 0644 like the file
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("UPDATE lab_users SET admin = admin")
    holder.commit()
    opened = sqlite_files(data_dir)
    assert len(opened) == 3 and all(mode_of(path) == 0o644 for path in opened)
    caplog.set_level(logging.WARNING)
    try:
        with GatewayServer(accounts_settings(data_dir, nbia_upstream)) as gw:
            assert httpx.get(gw.url + SERIES, headers=bearer(key)).status_code == 200
            assert mode_of(data_dir) == 0o700
            assert [mode_of(path) for path in opened] == [0o600] * 3
    finally:
        holder.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    for path in [data_dir, *opened]:
        assert sum(message.startswith(f"{path} ") for message in warnings) == 1, path
    assert all("0o755" in m or "0o644" in m for m in warnings if "open to other users" in m)
    assert all(key not in message for message in warnings)
    caplog.clear()
    with GatewayServer(accounts_settings(data_dir, nbia_upstream)) as gw:
        assert httpx.get(gw.url + SERIES, headers=bearer(key)).status_code == 200
    assert not [r for r in caplog.records if "open to other users" in r.getMessage()]


def test_the_users_command_fixes_an_open_data_dir_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    add_user(data_dir, "alice", capsys)
    data_dir.chmod(0o755)
    (data_dir / SQLITE_FILE).chmod(0o644)
    caplog.set_level(logging.WARNING)
    assert cli_main(["users", "list", "--data-dir", str(data_dir)]) == 0
    assert mode_of(data_dir) == 0o700 and mode_of(data_dir / SQLITE_FILE) == 0o600
    assert sum("open to other users" in r.getMessage() for r in caplog.records) == 2


def test_a_data_dir_holding_other_files_is_warned_about_not_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pointed at a shared directory (a home directory, /tmp), the gateway does not take it
    over: it warns and leaves the directory's mode alone (its own database is still 0600)."""
    shared = tmp_path / "home"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("someone else's file")
    caplog.set_level(logging.WARNING)
    add_user(shared, "alice", capsys)
    assert mode_of(shared) == 0o755
    assert mode_of(shared / SQLITE_FILE) == 0o600
    assert any(str(shared) in r.getMessage() for r in caplog.records)


def test_a_database_the_user_put_outside_the_data_dir(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    caplog: pytest.LogCaptureFixture,
    umask_022: None,
) -> None:
    """A SQLite file named by ``database_url`` outside the data dir is created 0600; one that
    exists with other bits set is the user's choice (maybe shared with a group on purpose):
    warned about, not changed."""
    fresh = tmp_path / "elsewhere" / "fresh.sqlite3"
    with GatewayServer(
        make_settings(tmp_path / "d1", nbia_upstream.url, database_url=f"sqlite:///{fresh}")
    ) as gw:
        assert httpx.get(gw.url + SERIES).status_code == 200
    assert mode_of(fresh) == 0o600
    shared = tmp_path / "elsewhere" / "shared.sqlite3"
    sqlite3.connect(shared).close()
    shared.chmod(0o640)
    caplog.set_level(logging.WARNING)
    with GatewayServer(
        make_settings(tmp_path / "d2", nbia_upstream.url, database_url=f"sqlite:///{shared}")
    ) as gw:
        assert httpx.get(gw.url + SERIES).status_code == 200
    assert mode_of(shared) == 0o640
    assert sum(r.getMessage().startswith(f"{shared} ") for r in caplog.records) == 1
    assert mode_of(tmp_path / "d2") == 0o700


def test_the_systemd_unit_keeps_the_state_directory_private() -> None:
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    assert "StateDirectoryMode=0700" in lines
    assert "UMask=0077" in lines


def forge(secret_values: list[str], deployment: str, mode: str, subject: str) -> list[str]:
    """Tokens for ``subject`` signed with every key a reader of the database could derive."""
    forged = []
    for value in secret_values:
        for secret in (bytes.fromhex(value) if _hex(value) else value.encode(), value.encode()):
            for key in (secret, signing_key(secret, mode, deployment)):
                tokens = ClientTokens(600, secret=key)
                answer = tokens.answer_token_request(
                    {"grant_type": "password", "username": subject, "password": "x"}
                )
                assert answer.body is not None
                forged.append(str(answer.body["access_token"]))
    return forged


def _hex(value: str) -> bool:
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_a_token_secret_file_a_reader_of_the_database_cannot_mint_a_token(
    backend: str,
    tmp_path: Path,
    nbia_upstream: FakeServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``token_secret_file`` (a mounted secret shared by replicas) keeps the signing secret out
    of the database: whatever a reader of every table can sign with is refused, while two
    replicas with the file accept each other's tokens."""
    with database(backend, tmp_path) as url:
        data_dir = tmp_path / "data"
        root_key = add_user(data_dir, "root", capsys, "--admin", url=url)
        shared = secret_file(tmp_path / "token-secret")
        settings = accounts_settings(
            data_dir, nbia_upstream, database_url=url, token_secret_file=shared
        )
        with GatewayServer(settings) as one, GatewayServer(settings) as two:
            tokens = post_form(one.url + TOKEN, login_form("root", root_key)).json()
            assert (
                httpx.get(two.url + STATS, headers=bearer(tokens["access_token"])).status_code
                == 200
            )
            engine = make_engine(database_url(url, data_dir))
            try:
                with engine.connect() as connection:
                    rows = connection.execute(select(GatewaySecret.name, GatewaySecret.value)).all()
            finally:
                engine.dispose()
            values = {row.name: row.value for row in rows}
            assert "token-signing" not in values
            assert values  # the deployment id is there, and public
            for forged in forge(
                list(values.values()), values.get("deployment", ""), "accounts", "root"
            ):
                status, _, _ = raw_get(one.url, STATS, f"Bearer {forged}")
                assert status == 401


def test_without_a_token_secret_file_postgresql_warns_what_to_protect(
    tmp_path: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    with database("postgresql", tmp_path) as url:
        caplog.set_level(logging.WARNING)
        with GatewayServer(accounts_settings(tmp_path, nbia_upstream, database_url=url)):
            pass
    warned = [r.getMessage() for r in caplog.records if "token_secret_file" in r.getMessage()]
    assert len(warned) == 1 and "gateway_secrets" in warned[0]


def test_a_token_secret_file_that_is_missing_short_or_open_to_others(
    tmp_path: Path, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(ValueError, match="token_secret_file"):
        make_settings(tmp_path, nbia_upstream.url, token_secret_file=missing)
    short = secret_file(tmp_path / "short", "abc")
    with pytest.raises(ValueError, match="at least 32"):
        make_settings(tmp_path, nbia_upstream.url, token_secret_file=short)
    code = cli_main(
        ["migrate", "--data-dir", str(tmp_path / "m"), "--token-secret-file", str(short)]
    )
    assert code == 2
    readable = secret_file(tmp_path / "readable")
    readable.chmod(0o644)
    caplog.set_level(logging.WARNING)
    with GatewayServer(
        accounts_settings(tmp_path / "d", nbia_upstream, token_secret_file=readable)
    ):
        pass
    assert mode_of(readable) == 0o644  # the user's file (perhaps a read-only mount): not changed
    assert sum(str(readable) in r.getMessage() for r in caplog.records) == 1
    assert all("x" * 40 not in r.getMessage() for r in caplog.records)


# --- item 4: a token is good only where it was issued --------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_open_mode_token_is_refused_by_an_accounts_gateway_on_the_same_database(
    backend: str,
    tmp_path: Path,
    nbia_upstream: FakeServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The open gateway signs a token for `root` (the lab's admin) for anyone who asks; the
    accounts gateway on the same database refuses it everywhere, logout included, and the real
    users and the cache are unaffected."""
    with database(backend, tmp_path) as url:
        data_dir = tmp_path / "data"
        alice = add_user(data_dir, "alice", capsys, url=url)
        admin = bearer(add_user(data_dir, "root", capsys, "--admin", url=url))
        accounts = accounts_settings(data_dir, nbia_upstream, database_url=url)
        open_mode = make_settings(data_dir, nbia_upstream.url, database_url=url)
        with GatewayServer(accounts) as gw, GatewayServer(open_mode) as open_gw:
            assert httpx.get(gw.url + SERIES, headers=bearer(alice)).status_code == 200
            before = httpx.get(gw.url + STATS, headers=admin).json()["entries"]
            status, _, body = raw_login(open_gw.url, "root", "anything at all")
            assert status == 200
            minted = httpx.Response(200, content=body).json()
            for target in (STATS, SERIES, f"{S}/v4/getCollectionValues"):
                status, _, _ = raw_get(gw.url, target, f"Bearer {minted['access_token']}")
                assert status == 401, target
            refresh = f"grant_type=refresh_token&refresh_token={minted['refresh_token']}"
            answer = post_form(gw.url + TOKEN, refresh)
            assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
            assert (
                httpx.post(gw.url + LOGOUT, headers=bearer(minted["access_token"])).status_code
                == 401
            )
            # The reverse: an accounts token means nothing to the open gateway (its audit
            # names no lab user, and its logout cannot end the lab user's session).
            lab = post_form(gw.url + TOKEN, login_form("alice", alice)).json()
            assert (
                open_gw.app.access.identify(
                    [(b"authorization", f"Bearer {lab['access_token']}".encode())]
                ).name
                == "anonymous"
            )
            assert (
                httpx.post(open_gw.url + LOGOUT, headers=bearer(lab["access_token"])).status_code
                == 401
            )
            assert (
                httpx.get(gw.url + SERIES, headers=bearer(lab["access_token"])).status_code == 200
            )
            assert httpx.get(gw.url + SERIES, headers=bearer(alice)).headers["x-cache"] == "HIT"
            after = httpx.get(gw.url + STATS, headers=admin).json()["entries"]
            assert after == before


def test_a_token_is_bound_to_its_deployment(
    tmp_path: Path, nbia_upstream: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two deployments that share a token_secret_file by mistake (staging and production from
    one mounted secret) still refuse each other's tokens, even for a user of the same name."""
    shared = secret_file(tmp_path / "token-secret")
    keys = {}
    for name in ("staging", "production"):
        keys[name] = add_user(tmp_path / name, "alice", capsys)
    staging = accounts_settings(tmp_path / "staging", nbia_upstream, token_secret_file=shared)
    production = accounts_settings(tmp_path / "production", nbia_upstream, token_secret_file=shared)
    with GatewayServer(staging) as one, GatewayServer(production) as two:
        token = post_form(one.url + TOKEN, login_form("alice", keys["staging"])).json()[
            "access_token"
        ]
        assert httpx.get(one.url + SERIES, headers=bearer(token)).status_code == 200
        assert raw_get(two.url, SERIES, f"Bearer {token}")[0] == 401


# --- item 8: a lockout refuses failures, never a valid credential --------------------------------


@pytest.fixture
def locked_lab(
    tmp_path: Path, nbia_upstream: FakeServer, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[GatewayServer, dict[str, str]]]:
    """An accounts gateway (2 free failures, lockouts doubling up to an hour) whose loopback
    address nine wrong keys have just locked out for 64 s (no test here waits that long)."""
    keys = {
        "alice": add_user(tmp_path, "alice", capsys),
        "root": add_user(tmp_path, "root", capsys, "--admin"),
    }
    settings = accounts_settings(
        tmp_path, nbia_upstream, login_free_failures=2, login_lockout_max_seconds=3600
    )
    with GatewayServer(settings) as gw:
        statuses = [raw_get(gw.url, SERIES, "Bearer " + "x" * 60)[0] for _ in range(9)]
        assert statuses[:2] == [401, 401] and set(statuses) <= {401, 429}
        assert gw.app.access.lockout.locked_for("127.0.0.1") > 60
        yield gw, keys


def test_a_valid_credential_is_admitted_from_a_locked_out_address(
    locked_lab: tuple[GatewayServer, dict[str, str]],
) -> None:
    gw, keys = locked_lab
    key = keys["alice"]
    assert raw_get(gw.url, SERIES, f"Bearer {key}")[0] == 200
    assert raw_get(gw.url, SERIES, basic("alice", key)["Authorization"])[0] == 200
    status, _, body = raw_login(gw.url, "alice", key)
    assert status == 200
    token = httpx.Response(200, content=body).json()["access_token"]
    assert raw_get(gw.url, SERIES, f"Bearer {token}")[0] == 200
    assert raw_get(gw.url, STATS, f"Bearer {keys['root']}")[0] == 200
    # The hit shortcut (a keep-alive GET answered from memory) admits it too.
    with httpx.Client(base_url=gw.url, headers=bearer(token)) as client:
        shortcut = gw.app.shortcut_hits
        answers = [client.get(SERIES) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3
    assert gw.app.shortcut_hits > shortcut


def test_further_failures_from_a_locked_out_address_are_refused_and_counted(
    locked_lab: tuple[GatewayServer, dict[str, str]],
) -> None:
    """While locked out, every wrong credential (key, Basic, token, login) gets 429 with a
    Retry-After that grows: the same answer whatever was wrong with it. No credential at all is
    still a plain 401 challenge, and a signed but ended token is no guess: 401."""
    gw, keys = locked_lab
    access = gw.app.access
    refused = access.lockout.refused
    waits = []
    for authorization in (
        "Bearer nbk_aaaaaaaaaaaa_" + "y" * 43,
        basic("alice", "wrong")["Authorization"],
        basic("nobody", keys["alice"])["Authorization"],
        "Bearer not-a-token",
    ):
        status, head, body = raw_get(gw.url, SERIES, authorization)
        assert status == 429, authorization
        assert b"too many failed" in body
        waits.append(retry_after(head))
    status, head, _ = raw_login(gw.url, "alice", "wrong")
    assert status == 429
    waits.append(retry_after(head))
    assert waits == sorted(waits) and waits[-1] > waits[0]
    assert access.lockout.refused == refused + 5
    assert raw_get(gw.url, SERIES, None)[0] == 401
    stats = httpx.get(gw.url + STATS, headers=bearer(keys["root"])).json()
    assert stats["access"]["lockout_refusals"] == refused + 5


def test_stale_tokens_are_no_guesses_and_lock_nobody_out(
    tmp_path: Path, nbia_upstream: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A notebook that keeps sending its logged-out token gets 401 every time (so it logs in
    again) and its address is not locked out for it."""
    key = add_user(tmp_path, "alice", capsys)
    settings = accounts_settings(tmp_path, nbia_upstream, login_free_failures=2)
    with GatewayServer(settings) as gw:
        token = post_form(gw.url + TOKEN, login_form("alice", key)).json()["access_token"]
        assert httpx.post(gw.url + LOGOUT, headers=bearer(token)).status_code == 204
        assert [raw_get(gw.url, SERIES, f"Bearer {token}")[0] for _ in range(10)] == [401] * 10
        assert gw.app.access.lockout.locked_for("127.0.0.1") == 0
        assert raw_get(gw.url, SERIES, "Bearer wrong")[0] == 401


def test_a_hostile_client_cannot_lock_out_the_others_behind_its_address(
    locked_lab: tuple[GatewayServer, dict[str, str]],
) -> None:
    """One client behind the lab's NAT floods wrong credentials; the lab's users at the same
    address keep getting every answer; the cache is unchanged; the flooder only gets 429s."""
    gw, keys = locked_lab
    admin = bearer(keys["root"])
    with httpx.Client(base_url=gw.url) as client:
        assert client.get(SERIES, headers=bearer(keys["alice"])).status_code == 200
        entries = client.get(STATS, headers=admin).json()["entries"]

    def flood(i: int) -> int:
        return raw_get(gw.url, SERIES, f"Bearer nbk_{i:012d}_" + "z" * 43)[0]

    def user(i: int) -> int:
        headers = basic("alice", keys["alice"]) if i % 2 else bearer(keys["alice"])
        return raw_get(gw.url, SERIES, headers["Authorization"])[0]

    # Interleaved: every fifth request is a lab user's, amid the flood, on 8 connections at once.
    jobs = [(user if i % 5 == 0 else flood, i) for i in range(250)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda job: (job[0].__name__, job[0](job[1])), jobs))
    assert {status for who, status in statuses if who == "flood"} == {429}
    assert [status for who, status in statuses if who == "user"] == [200] * 50
    with httpx.Client(base_url=gw.url) as client:
        assert client.get(STATS, headers=admin).json()["entries"] == entries

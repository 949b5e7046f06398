"""Accounts mode: lab users with API keys, NBIA's token flow for them, admin-only control,
lockouts for guessing, per-user limits, and no leak of any secret through any of it.

Users are created with the real ``nbia-proxy users`` command on the gateway's own database,
then a gateway in accounts mode runs in front of the fake NBIA.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.accounts.directory import Directory
from proxy.accounts.registry import Registry
from proxy.cli import main as cli_main
from proxy.db import SQLITE_FILE, database_url, make_engine, migrate
from tests.databases import BACKENDS, database
from tests.fake_nbia import FakeServer
from tests.gateway_server import Clock, GatewayServer, make_settings, send_raw

S = "/nbia-api/services"
SERIES = f"{S}/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"
TOKEN = "/nbia-api/oauth/token"
LOGOUT = "/nbia-api/logout"
STATS = "/_proxy/cache/stats"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
REFRESH_SECONDS = 0.2


def users_cli(data_dir: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``nbia-proxy users ...`` on the data dir's database; return what it printed."""
    code = cli_main(["users", *args, "--data-dir", str(data_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def new_key(data_dir: Path, name: str, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    printed = users_cli(data_dir, "add", name, *flags, capsys=capsys)
    return printed.strip().splitlines()[-1]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def login(gw: GatewayServer, name: str, key: str) -> httpx.Response:
    form = {"username": name, "password": key, "client_id": "nbia", "grant_type": "password"}
    return httpx.post(gw.url + TOKEN, data=form)


def access_token(gw: GatewayServer, name: str, key: str) -> str:
    """The access token ``name`` gets by logging in with ``key`` (the login must succeed)."""
    answer = login(gw, name, key)
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def wait_until(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """Poll ``check`` until it holds (the gateway re-reads accounts every REFRESH_SECONDS)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class Lab:
    """An accounts-mode gateway with two users: alice (member) and root (admin)."""

    def __init__(self, gw: GatewayServer, data_dir: Path, keys: dict[str, str]) -> None:
        self.gw = gw
        self.data_dir = data_dir
        self.keys = keys
        self.snapshot: dict[str, Any] = {}  # what a test recorded before an onslaught

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(self.gw.url + path, headers=headers, timeout=30)


LabFactory = Callable[..., Lab]


@pytest.fixture
def make_lab(
    tmp_path: Path,
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[LabFactory]:
    servers: list[GatewayServer] = []

    def make(clock: Clock | None = None, **extra: Any) -> Lab:
        keys = {
            "alice": new_key(tmp_path, "alice", capsys),
            "root": new_key(tmp_path, "root", capsys, "--admin"),
        }
        settings = make_settings(
            tmp_path,
            nbia_upstream.url,
            nlst_upstream.url,
            access="accounts",
            accounts_refresh_seconds=REFRESH_SECONDS,
            **extra,
        )
        server = GatewayServer(settings, **({"cache_clock": clock} if clock else {}))
        servers.append(server.__enter__())
        return Lab(server, tmp_path, keys)

    yield make
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def lab(make_lab: LabFactory) -> Lab:
    return make_lab()


# --- the users command -----------------------------------------------------------------------


def test_users_add_list_revoke_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key(tmp_path, "alice", capsys)
    assert key.startswith("nbk_") and len(key) > 50
    new_key(tmp_path, "bob", capsys, "--admin")
    listed = json.loads(users_cli(tmp_path, "list", capsys=capsys))
    assert [(u["name"], u["admin"], u["status"]) for u in listed] == [
        ("alice", False, "active"),
        ("bob", True, "active"),
    ]
    users_cli(tmp_path, "revoke", "alice", capsys=capsys)
    statuses = {
        u["name"]: u["status"] for u in json.loads(users_cli(tmp_path, "list", capsys=capsys))
    }
    assert statuses == {"alice": "revoked", "bob": "active"}
    rotated = users_cli(tmp_path, "rotate", "alice", capsys=capsys).strip().splitlines()[-1]
    assert rotated.startswith("nbk_") and rotated != key
    statuses = {
        u["name"]: u["status"] for u in json.loads(users_cli(tmp_path, "list", capsys=capsys))
    }
    assert statuses["alice"] == "active"  # rotating reinstates


def test_keys_are_stored_only_as_salted_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [new_key(tmp_path, name, capsys) for name in ("u1", "u2")]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(SQLITE_FILE + "*"))  # with the WAL
    with sqlite3.connect(tmp_path / SQLITE_FILE) as db:
        rows = db.execute("SELECT salt, key_hash FROM lab_users").fetchall()
    for key in keys:
        assert key.encode() not in raw
        secret = key.split("_", 2)[2]
        assert secret.encode() not in raw
    salts = {salt for salt, _ in rows}
    assert len(salts) == 2 and all(len(h) == 64 for _, h in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "alice"], "already exists"),
        (["add", "bad name!"], "user name"),
        (["revoke", "nobody"], "no user named nobody"),
        (["rotate", "nobody"], "no user named nobody"),
    ],
)
def test_users_command_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    new_key(tmp_path, "alice", capsys)
    assert cli_main(["users", *args, "--data-dir", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err


# --- who gets in -----------------------------------------------------------------------------


def test_missing_credentials_get_a_401_json_and_health_stays_open(
    lab: Lab, nbia_upstream: FakeServer
) -> None:
    refused = lab.get(SERIES)
    assert refused.status_code == 401
    assert refused.json() == {"error": "authentication required"}
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert (refused.headers["x-cache"], refused.headers["age"]) == ("BYPASS", "0")
    assert lab.get("/nlst" + SERIES).status_code == 401
    assert nbia_upstream.app.requests_to("/v4/getSeries") == []
    assert lab.get("/healthz").status_code == 200
    assert lab.get("/readyz").json() == {"status": "ready"}  # the probes need no credentials


def test_a_key_as_bearer_gets_through_and_never_goes_upstream(
    lab: Lab, nbia_upstream: FakeServer
) -> None:
    key = lab.keys["alice"]
    answer = lab.get(SERIES, bearer(key))
    assert (answer.status_code, answer.headers["x-cache"]) == (200, "MISS")
    seen = nbia_upstream.app.requests_to("/v4/getSeries")
    assert len(seen) == 1 and key not in repr(seen[0].headers)


def test_http_basic_with_the_key_as_password_gets_through(lab: Lab) -> None:
    basic = base64.b64encode(f"alice:{lab.keys['alice']}".encode()).decode()
    assert lab.get(SERIES, {"Authorization": f"Basic {basic}"}).status_code == 200
    wrong = base64.b64encode(f"root:{lab.keys['alice']}".encode()).decode()
    assert lab.get(SERIES, {"Authorization": f"Basic {wrong}"}).status_code == 401


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer nbk_aaaaaaaaaaaa_" + "A" * 43,
        "Bearer not-a-key",
        "Bearer",
        "Basic !!!",
        "Token whatever",
    ],
)
def test_wrong_credentials_get_a_401(lab: Lab, authorization: str) -> None:
    answer = lab.get(SERIES, {"Authorization": authorization})
    assert answer.status_code == 401
    assert answer.json()["error"] in ("invalid or expired credentials", "authentication required")


def test_a_tampered_key_is_refused(lab: Lab) -> None:
    key = lab.keys["alice"]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert lab.get(SERIES, bearer(tampered)).status_code == 401


def test_cache_hits_still_need_credentials(lab: Lab) -> None:
    """A cached answer is served only to a lab user, on the fast path and the ASGI path."""
    key = lab.keys["alice"]
    assert lab.get(SERIES, bearer(key)).headers["x-cache"] == "MISS"
    with httpx.Client(base_url=lab.gw.url) as client:  # keep-alive: the in-protocol hit path
        assert client.get(SERIES, headers=bearer(key)).headers["x-cache"] == "HIT"
        assert client.get(SERIES).status_code == 401
        assert client.get(SERIES, headers=bearer("nope")).status_code == 401
        assert client.get(SERIES, headers=bearer(key)).headers["x-cache"] == "HIT"
    status, _, body = send_raw(
        lab.gw.url,
        f"GET {SERIES} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 401 and b"authentication required" in body


# --- NBIA's token flow for lab users ----------------------------------------------------------


def test_login_refresh_logout_for_a_lab_user(lab: Lab) -> None:
    answer = login(lab.gw, "alice", lab.keys["alice"])
    assert answer.status_code == 200
    tokens = answer.json()
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] > 0
    assert lab.get(SERIES, bearer(tokens["access_token"])).status_code == 200
    refreshed = httpx.post(
        lab.gw.url + TOKEN,
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
    )
    assert refreshed.status_code == 200
    renewed = refreshed.json()
    assert lab.get(SERIES, bearer(renewed["access_token"])).status_code == 200
    assert lab.get(SERIES, bearer(tokens["access_token"])).status_code == 401  # retired
    out = httpx.post(lab.gw.url + LOGOUT, headers=bearer(renewed["access_token"]))
    assert out.status_code == 204
    assert lab.get(SERIES, bearer(renewed["access_token"])).status_code == 401
    again = httpx.post(
        lab.gw.url + TOKEN,
        data={"grant_type": "refresh_token", "refresh_token": renewed["refresh_token"]},
    )
    assert again.status_code == 400 and "access_token" not in again.json()


@pytest.mark.parametrize(
    ("name", "key_of"),
    [("alice", "wrong"), ("root", "alice"), ("mallory", "alice"), ("alice", "")],
    ids=["wrong-key", "someone-elses-key", "unknown-user", "empty-password"],
)
def test_wrong_login_gets_nbias_401(lab: Lab, name: str, key_of: str) -> None:
    password = lab.keys.get(key_of, key_of)
    answer = login(lab.gw, name, password)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_grant"


def test_gateway_tokens_expire(make_lab: LabFactory) -> None:
    clock = Clock(
        time.time() + 60
    )  # after the users are created (tokens older than a key are void)
    lab = make_lab(clock, client_token_lifetime_seconds=600)
    token = access_token(lab.gw, "alice", lab.keys["alice"])
    clock.advance(599)
    assert lab.get(SERIES, bearer(token)).status_code == 200
    clock.advance(2)
    assert lab.get(SERIES, bearer(token)).status_code == 401


def test_a_token_from_another_gateway_is_refused(make_lab: LabFactory, tmp_path: Path) -> None:
    """Tokens are signed with the database's secret: a token minted with any other is void."""
    lab = make_lab()
    from proxy.client_tokens import ClientTokens

    forged = ClientTokens(600).answer_token_request(
        {"grant_type": "password", "username": "alice", "password": "x"}
    )
    assert forged.body is not None
    assert lab.get(SERIES, bearer(forged.body["access_token"])).status_code == 401


def test_revoking_a_user_ends_their_key_and_tokens(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    key = lab.keys["alice"]
    token = access_token(lab.gw, "alice", key)
    users_cli(lab.data_dir, "revoke", "alice", capsys=capsys)
    assert wait_until(lambda: lab.get(SERIES, bearer(key)).status_code == 401)
    assert lab.get(SERIES, bearer(token)).status_code == 401
    assert login(lab.gw, "alice", key).status_code == 401
    assert lab.get(SERIES, bearer(lab.keys["root"])).status_code == 200


def test_rotating_a_key_ends_the_old_key_and_its_tokens(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    old = lab.keys["alice"]
    token = access_token(lab.gw, "alice", old)
    time.sleep(0.01)  # the rotation happens strictly after the token was issued
    new = users_cli(lab.data_dir, "rotate", "alice", capsys=capsys).strip().splitlines()[-1]
    assert wait_until(lambda: lab.get(SERIES, bearer(new)).status_code == 200)
    assert lab.get(SERIES, bearer(old)).status_code == 401
    assert lab.get(SERIES, bearer(token)).status_code == 401


def test_a_user_added_while_running_gets_in(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    key = new_key(lab.data_dir, "carol", capsys)
    assert wait_until(lambda: lab.get(SERIES, bearer(key)).status_code == 200)


# --- admin -----------------------------------------------------------------------------------


def test_control_endpoints_need_an_admin(lab: Lab) -> None:
    assert lab.get(STATS).status_code == 401
    member = lab.get(STATS, bearer(lab.keys["alice"]))
    assert member.status_code == 403 and member.json() == {"error": "an admin account is required"}
    purge = httpx.delete(lab.gw.url + "/_proxy/cache", headers=bearer(lab.keys["alice"]))
    assert purge.status_code == 403
    admin = lab.get(STATS, bearer(lab.keys["root"]))
    assert admin.status_code == 200 and admin.json()["access"]["mode"] == "accounts"
    assert lab.get("/_proxy/nothing", bearer(lab.keys["root"])).status_code == 404
    assert lab.get("/_proxy/nothing").status_code == 401


# --- guessing and fairness --------------------------------------------------------------------


def test_repeated_failures_lock_the_address_out(make_lab: LabFactory) -> None:
    lab = make_lab(login_free_failures=2, login_lockout_max_seconds=1)
    key = lab.keys["alice"]
    for _ in range(2):
        assert lab.get(SERIES, bearer("wrong")).status_code == 401
    assert login(lab.gw, "alice", "wrong").status_code == 401  # the third: locks out for 1 s
    locked = lab.get(SERIES, bearer("wrong"))
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1
    assert login(lab.gw, "alice", "wrong").status_code == 429
    # Only failures are held back: the valid key gets in (tests/test_failsafe_access.py).
    assert lab.get(SERIES, bearer(key)).status_code == 200
    lockout = lab.gw.app.access.lockout
    assert wait_until(lambda: lockout.locked_for("127.0.0.1") == 0, seconds=3)
    assert lab.get(SERIES, bearer("wrong")).status_code == 401
    stats = lab.get(STATS, bearer(lab.keys["root"])).json()
    assert stats["access"]["lockout_refusals"] >= 2


def test_per_user_rate_limit(make_lab: LabFactory) -> None:
    """At 0.5 requests/s (a burst of one), the second of quick requests is refused with a
    Retry-After; another user is not affected."""
    lab = make_lab(user_rate_per_second=0.5)
    alice = bearer(lab.keys["alice"])
    answers = [lab.get(f"{S}/v4/getSeries?Collection=R{i}", alice) for i in range(4)]
    statuses = [a.status_code for a in answers]
    assert statuses[0] == 200 and statuses[1] == 429, statuses
    refused = answers[1]
    assert refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
    assert lab.get(SERIES, bearer(lab.keys["root"])).status_code == 200
    stats = lab.get(STATS, bearer(lab.keys["root"])).json()  # admin reads are not rate-limited
    assert stats["access"]["rate_refusals"] >= 1


def test_per_user_downloads_queue_behind_each_other(
    make_lab: LabFactory, nbia_upstream: FakeServer
) -> None:
    lab = make_lab(user_max_downloads=1)
    zip_path = f"{S}/v4/getImage?SeriesInstanceUID={nbia_upstream.app.big_series_uid}"
    nbia_upstream.app.slow(seconds_before_headers=1.5, path_contains="getImage")
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(
            pool.map(
                lambda who: lab.get(zip_path, bearer(lab.keys[who])), ["alice", "alice", "root"]
            )
        )
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].content == answers[1].content == answers[2].content
    stats = lab.get(STATS, bearer(lab.keys["root"])).json()
    assert stats["access"]["downloads_queued"] == 1  # alice's second; root never waited


def test_a_download_left_going_on_alone_holds_its_users_slot(
    make_lab: LabFactory, nbia_upstream: FakeServer
) -> None:
    """A user who starts a download and hangs up has the series cache finish it, in one of
    their download slots: hanging up does not let them start more downloads than their share."""
    lab = make_lab(user_max_downloads=1)
    fake = nbia_upstream.app
    one, two = (
        f"{S}/v4/getImage?SeriesInstanceUID="
        + next(s.uid for s in fake.dataset.series if s.collection == name)
        for name in ("4D-Lung", "TCGA-KIRC")
    )
    fake.slow(seconds_between_chunks=0.05, path_contains="getImage")
    alice = bearer(lab.keys["alice"])
    assert lab.gw.app.series is not None
    fills, limits = lab.gw.app.series.fills, lab.gw.app.access.limits
    with httpx.Client(timeout=60) as client, client.stream("GET", lab.gw.url + one, headers=alice):
        pass  # the head came: hang up
    while fills.counters.background < 1:  # the fill goes on without alice
        time.sleep(0.02)
    assert limits.busy("alice") == 1  # ... in her slot
    second = lab.get(two, alice)  # waits for the first fill to end
    assert second.status_code == 200
    assert limits.queued == 1
    assert lab.get(one, alice).headers["x-cache"] == "HIT"


# --- secrets ---------------------------------------------------------------------------------


def test_no_secret_leaks_through_any_auth_path(
    make_lab: LabFactory, nbia_upstream: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Every answer and log line of every path above is searched for every secret: the lab
    keys, gateway tokens, and the upstream service token and password."""
    caplog.set_level(logging.DEBUG)
    fake = nbia_upstream.app
    fake.users = {"lab-svc": "svc-pw-Zq81"}
    lab = make_lab(username="lab-svc", password="svc-pw-Zq81", login_free_failures=100)
    key, admin = lab.keys["alice"], lab.keys["root"]
    seen: list[httpx.Response] = []
    issued = login(lab.gw, "alice", key)
    seen.append(issued)
    tokens = issued.json()
    seen += [
        lab.get(f"{S}/getCollectionValues", bearer(key)),  # root endpoint: service token used
        lab.get(f"{S}/v2/getCollectionValues", bearer(tokens["access_token"])),
        lab.get(SERIES, bearer(key[:-2])),
        lab.get(STATS, bearer(admin)),
        lab.get(STATS, bearer(key)),
        login(lab.gw, "alice", key[:-3] + "xyz"),
        httpx.post(
            lab.gw.url + TOKEN,
            data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        ),
        httpx.post(lab.gw.url + LOGOUT, headers=bearer(tokens["access_token"])),
    ]
    assert fake.issued_access_tokens, "the root endpoint must have used the service token"
    secrets = (
        {key, admin, "svc-pw-Zq81", tokens["access_token"], tokens["refresh_token"]}
        | fake.issued_access_tokens
        | set(fake.tokens.refresh)
    )
    for response in seen:
        text = response.text + repr(dict(response.headers))
        for secret in secrets - {tokens["access_token"], tokens["refresh_token"]}:
            assert secret not in text
    for secret in secrets:
        assert secret not in caplog.text
    # Only the login answer itself may carry the gateway tokens it issued.
    assert all(tokens["access_token"] not in r.text for r in seen[1:])


def test_tcia_utils_as_a_lab_user(lab: Lab) -> None:
    """tcia-utils, pointed at the gateway with a lab credential, works; without one it fails."""
    from tcia_utils import nbia

    from proxy.tcia import use_gateway

    use_gateway(lab.gw.url, user="alice", api_key=lab.keys["alice"])
    try:
        collections = nbia.getCollections()
        assert collections and all("Collection" in c for c in collections)
    finally:
        use_gateway(lab.gw.url)
    assert nbia.getCollections() is None  # refused: tcia-utils reports the error and gives None


AUTH_VALUES = st.one_of(
    st.text(max_size=80).map(lambda t: "Bearer " + t),
    st.text(max_size=80).map(lambda t: "Basic " + t),
    st.binary(max_size=60).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=60).map(
        lambda t: "Bearer nbk_" + t
    ),
    st.text(max_size=40),
)


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(authorization=AUTH_VALUES, path=st.sampled_from([SERIES, STATS, "/_proxy/x", LOGOUT]))
def test_generated_credentials_never_get_in_or_break_anything(
    auth_lab: Lab, authorization: str, path: str
) -> None:
    """Thousands of made-up credentials: every one is refused with a 4xx JSON answer."""
    value = authorization.encode("utf-8").replace(b"\r", b"").replace(b"\n", b"")
    request = (
        b"GET "
        + path.encode()
        + b" HTTP/1.1\r\nHost: gateway\r\nAuthorization: "
        + value
        + b"\r\nConnection: close\r\n\r\n"
    )
    status, _, body = send_raw(auth_lab.gw.url, request)
    assert status in (400, 401), body  # 400: the HTTP parser refused the header bytes
    assert b"Traceback" not in body


@pytest.fixture(scope="module")
def auth_lab(
    tmp_path_factory: pytest.TempPathFactory, fake_nbia: FakeServer, fake_nlst: FakeServer
) -> Iterator[Lab]:
    """One accounts-mode gateway for all generated examples (no lockouts: it is the target)."""
    data_dir = tmp_path_factory.mktemp("auth-lab")
    url = database_url(None, data_dir)
    migrate(url)
    engine = make_engine(url)
    keys = {"root": Registry(engine).add("root", admin=True)}
    engine.dispose()
    settings = make_settings(
        data_dir, fake_nbia.url, fake_nlst.url, access="accounts", login_free_failures=10**9
    )
    with GatewayServer(settings) as server:
        lab = Lab(server, data_dir, keys)
        warm = lab.get(SERIES, bearer(keys["root"]))
        assert warm.status_code == 200
        lab.snapshot = {"body": warm.content, "stats": lab.get(STATS, bearer(keys["root"])).json()}
        yield lab


def test_after_generated_credentials_the_gateway_is_healthy_and_the_cache_unchanged(
    auth_lab: Lab,
) -> None:
    """Runs after the generated credentials (same module gateway): nothing they sent got in,
    so the cache holds exactly what it held before, and still answers."""
    root = bearer(auth_lab.keys["root"])
    assert auth_lab.get("/healthz").status_code == 200
    after = auth_lab.get(STATS, root).json()
    before = auth_lab.snapshot["stats"]
    assert before["entries"] == 1
    assert (after["entries"], after["bytes"], after["misses"]) == (
        before["entries"],
        before["bytes"],
        before["misses"],
    )
    again = auth_lab.get(SERIES, root)
    assert (again.headers["x-cache"], again.content) == ("HIT", auth_lab.snapshot["body"])


def test_audit_lines_name_the_lab_user(lab: Lab) -> None:
    key = lab.keys["alice"]
    token = access_token(lab.gw, "alice", key)
    lab.get(SERIES, bearer(key))  # miss
    with httpx.Client(base_url=lab.gw.url) as client:
        client.get(SERIES, headers=bearer(token))  # hit (in-protocol)
    lab.get(SERIES)  # refused

    def series_lines() -> list[dict[str, Any]]:
        lines = lab.gw.audit_lines(0, timeout=0)
        return [line for line in lines if line["path"].endswith("/v4/getSeries")]

    # Lines are written in batches, up to a second after their answer.
    waited = time.monotonic() + 10
    while len(series_lines()) < 3 and time.monotonic() < waited:
        time.sleep(0.01)
    series = series_lines()
    assert [(line["user"], line["status"], line["cache"]) for line in series] == [
        ("alice", 200, "MISS"),
        ("alice", 200, "HIT"),
        ("-", 401, "-"),
    ]
    assert lab.gw.app.audit.target is not None
    text = Path(lab.gw.app.audit.target).read_text()
    assert key not in text and token not in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_and_directory_on_both_backends(backend: str, tmp_path: Path) -> None:
    """What the users command and a running gateway do, on SQLite and on PostgreSQL."""
    with database(backend, tmp_path) as url:
        migrate(url)
        engine = make_engine(url)
        try:
            registry = Registry(engine)
            key = registry.add("alice")
            admin_key = registry.add("root", admin=True)
            directory = Directory(registry)
            directory.load()
            alice = directory.user_for_key(key)
            assert alice is not None and alice.name == "alice" and not alice.admin
            assert directory.check_login("alice", key) == "alice"
            assert directory.check_login("root", key) is None
            assert registry.token_secret() == registry.token_secret()  # created once, kept
            registry.end_session("s1", expires_at=time.time() + 60)
            registry.end_session("s1", expires_at=time.time() + 60)  # twice is fine
            registry.end_session("old", expires_at=time.time() - 1)
            assert set(registry.ended_sessions()) == {"s1"}
            new = registry.rotate("alice")
            registry.revoke("root")
            directory.load()
            assert directory.user_for_key(key) is None and directory.user_for_key(new)
            assert directory.user_for_key(admin_key) is None
        finally:
            engine.dispose()


def test_ended_sessions_reach_the_database_for_other_replicas(lab: Lab) -> None:
    """A logout is written to the database within accounts_refresh_seconds, so that another
    gateway on the same database refuses the token too."""
    tokens = login(lab.gw, "alice", lab.keys["alice"]).json()
    assert (
        httpx.post(lab.gw.url + LOGOUT, headers=bearer(tokens["access_token"])).status_code == 204
    )
    directory = lab.gw.app.access.directory
    assert directory is not None
    session = tokens["session_state"].replace("-", "")
    assert wait_until(lambda: session in directory.registry.ended_sessions())


def test_two_replicas_on_one_database_share_tokens_and_logouts(lab: Lab) -> None:
    """Tokens are signed with the database's secret: one replica accepts another's tokens, and
    a logout at one reaches the other within accounts_refresh_seconds."""
    with GatewayServer(lab.gw.settings) as other:
        tokens = login(lab.gw, "alice", lab.keys["alice"]).json()
        headers = bearer(tokens["access_token"])
        assert httpx.get(other.url + SERIES, headers=headers).status_code == 200
        assert httpx.post(lab.gw.url + LOGOUT, headers=headers).status_code == 204
        assert wait_until(lambda: httpx.get(other.url + SERIES, headers=headers).status_code == 401)

"""The client side of NBIA's token protocol, answered by the gateway itself.

Through a running gateway whose upstreams are unreachable (``http://127.0.0.1:9``): every
token and logout answer below is therefore produced locally, and the control test shows that
anything that did go upstream would fail. Then :class:`proxy.client_tokens.ClientTokens`
directly, with an injected clock (no sleeping).

Expected shapes come from the catalog (nbia-api.md §1.3) and the NBIA guide (seed L85-L154).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import client_tokens
from proxy.client_tokens import ClientTokens, TokenAnswer
from tests.gateway_server import GatewayServer, make_settings

UNREACHABLE = "http://127.0.0.1:9"  # discard port: connection refused
TOKEN = "/nbia-api/oauth/token"
LOGOUT = "/nbia-api/logout"
# Catalog §1.3: the fields of a token answer (seed L121 plus token_type/id_token of L145).
TOKEN_FIELDS = {
    "access_token",
    "expires_in",
    "refresh_expires_in",
    "refresh_token",
    "token_type",
    "id_token",
    "not-before-policy",
    "session_state",
    "scope",
}
# Seed L114 (guest) and L88 (a named account), as curl -d sends them.
GUEST_LOGIN = b"username=nbia_guest&password=&client_id=NBIA&grant_type=password"
USER_LOGIN = b"username=USERNAME&password=PASSWORD&client_id=NBIA&grant_type=password"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def refresh_form(refresh_token: str) -> bytes:
    """Seed L139's refresh request."""
    form = "username=USERNAME&client_id=nbia&grant_type=refresh_token&refresh_token="
    return (form + refresh_token).encode()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A client for one gateway in front of unreachable upstreams (main and NLST)."""
    settings = make_settings(
        tmp_path_factory.mktemp("tokens"), UNREACHABLE, connect_timeout_seconds=1
    )
    with GatewayServer(settings) as gateway, httpx.Client(base_url=gateway.url, timeout=5) as c:
        yield c


def login(client: httpx.Client, path: str = TOKEN, body: bytes = GUEST_LOGIN) -> dict[str, Any]:
    response = client.post(path, content=body, headers=FORM)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def logout(client: httpx.Client, access_token: str, path: str = LOGOUT) -> httpx.Response:
    return client.post(path, headers={"Authorization": f"Bearer {access_token}"})


def assert_token_shape(answer: dict[str, Any], lifetime: int = 7200) -> None:
    """NBIA's (Keycloak's) token JSON: the documented fields, types and fixed values."""
    assert set(answer) == TOKEN_FIELDS
    assert answer["expires_in"] == answer["refresh_expires_in"] == lifetime
    assert answer["token_type"] == "Bearer"
    assert answer["not-before-policy"] == 0
    assert answer["scope"] == "openid profile email"
    assert UUID.fullmatch(answer["session_state"])
    for name in ("access_token", "refresh_token", "id_token"):
        assert isinstance(answer[name], str) and len(answer[name]) >= 16
    assert len({answer["access_token"], answer["refresh_token"], answer["id_token"]}) == 3


def assert_oauth_error(response: httpx.Response) -> None:
    """A 4xx JSON error that no cache may keep."""
    assert 400 <= response.status_code < 500, response.status_code
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert isinstance(response.json().get("error"), str)


# --- through the gateway ---------------------------------------------------------------------


def test_upstream_really_is_unreachable(client: httpx.Client) -> None:
    """Control: a forwarded request fails with 502, so the answers below were made locally."""
    response = client.get("/nbia-api/services/v4/getCollectionValues")
    assert response.status_code == 502
    response = client.get("/nlst/nbia-api/services/v4/getCollectionValues")
    assert response.status_code == 502


@pytest.mark.parametrize("body", [GUEST_LOGIN, USER_LOGIN], ids=["guest", "named-account"])
def test_password_grant_answers_in_nbias_shape(client: httpx.Client, body: bytes) -> None:
    """A password grant gets 200 and NBIA's token JSON, typed JSON and marked no-store."""
    response = client.post(TOKEN, content=body, headers=FORM)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert (response.headers["x-cache"], response.headers["age"]) == ("BYPASS", "0")
    assert_token_shape(response.json())


def test_every_login_gets_new_tokens(client: httpx.Client) -> None:
    """Two logins of the same account get different tokens and sessions."""
    first, second = login(client), login(client)
    for name in ("access_token", "refresh_token", "session_state"):
        assert first[name] != second[name]


@pytest.mark.parametrize(
    "path", ["/nbia-api/services/oauth/token", "/nlst/nbia-api/oauth/token"], ids=["alias", "nlst"]
)
def test_token_endpoint_alias_and_nlst_mount(client: httpx.Client, path: str) -> None:
    """The Keycloak build's /services alias and the NLST mount answer the same way."""
    assert_token_shape(login(client, path))


def test_nlst_mount_logout(client: httpx.Client) -> None:
    """A token obtained under /nlst/ is revoked by /nlst/nbia-api/logout."""
    answer = login(client, "/nlst/nbia-api/oauth/token")
    assert logout(client, answer["access_token"], "/nlst/nbia-api/logout").status_code == 204


def test_query_string_grant_of_old_clients(client: httpx.Client) -> None:
    """tcia-utils 1.0 sent the password grant as a GET query string (catalog §1.3)."""
    response = client.get(
        TOKEN,
        params={
            "username": "nbia_guest",
            "password": "",
            "grant_type": "password",
            "client_id": "nbiaRestAPIClient",
            "client_secret": "x",
        },
    )
    assert response.status_code == 200
    assert_token_shape(response.json())


def test_refresh_rotates_the_tokens(client: httpx.Client) -> None:
    """Seed L139's refresh request gets new tokens; the old refresh token then no longer
    works, the new one does, and the old access token can no longer log out."""
    first = login(client)
    response = client.post(TOKEN, content=refresh_form(first["refresh_token"]), headers=FORM)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    second = response.json()
    assert_token_shape(second)
    assert second["access_token"] != first["access_token"]
    assert second["refresh_token"] != first["refresh_token"]

    reused = client.post(TOKEN, content=refresh_form(first["refresh_token"]), headers=FORM)
    assert_oauth_error(reused)
    assert logout(client, first["access_token"]).status_code == 401
    again = client.post(TOKEN, content=refresh_form(second["refresh_token"]), headers=FORM)
    assert again.status_code == 200


def test_logout_revokes_and_a_second_logout_is_refused(client: httpx.Client) -> None:
    """Logout with the bearer token answers 204 with no body; the session is gone, so a
    second logout gets 401 JSON and the session's refresh token is refused."""
    answer = login(client)
    first = logout(client, answer["access_token"])
    assert first.status_code == 204
    assert first.content == b""
    assert first.headers["cache-control"] == "no-store"
    second = logout(client, answer["access_token"])
    assert second.status_code == 401
    assert second.headers["content-type"] == "application/json"
    assert isinstance(second.json()["error"], str)
    assert_oauth_error(
        client.post(TOKEN, content=refresh_form(answer["refresh_token"]), headers=FORM)
    )


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer undefined"}, {"Authorization": "Bearer not-a-gateway-token"}],
    ids=["no-header", "bearer-undefined", "unknown-token"],
)
def test_logout_without_a_valid_token_is_refused(
    client: httpx.Client, headers: dict[str, str]
) -> None:
    """No token, NBIA's "Bearer undefined" and a foreign token all get 401 JSON (§1.3)."""
    response = client.post(LOGOUT, headers=headers)
    assert response.status_code == 401
    assert_oauth_error(response)


@pytest.mark.parametrize(
    "body",
    [
        b"username=nbia_guest&password=&client_id=NBIA",
        b"username=nbia_guest&password=&client_id=NBIA&grant_type=",
        b"username=nbia_guest&client_id=nbia&grant_type=client_credentials",
        b"username=nbia_guest&client_id=nbia&grant_type=refresh_token&refresh_token=bogus",
        b"username=nbia_guest&client_id=nbia&grant_type=refresh_token",
    ],
    ids=["missing-grant", "empty-grant", "unknown-grant", "bad-refresh", "no-refresh-token"],
)
def test_bad_token_requests_get_json_errors(client: httpx.Client, body: bytes) -> None:
    """Missing or unknown grant types and bad refresh tokens get a 4xx JSON error, no token."""
    response = client.post(TOKEN, content=body, headers=FORM)
    assert_oauth_error(response)
    assert "access_token" not in response.json()


def test_token_endpoint_refuses_other_methods(client: httpx.Client) -> None:
    """Only POST (and the legacy GET) reach the grant logic."""
    response = client.put(TOKEN, content=GUEST_LOGIN, headers=FORM)
    assert response.status_code == 405


def test_refresh_token_expires_with_the_injected_clock(tmp_path: Path) -> None:
    """Gateway tokens live client_token_lifetime_seconds on the gateway's wall clock: a refresh
    just before the end works, one after it is refused (no sleeping: the clock is moved)."""
    clock = FakeClock()
    settings = make_settings(tmp_path, UNREACHABLE, client_token_lifetime_seconds=600)
    with (
        GatewayServer(settings, cache_clock=clock) as gateway,
        httpx.Client(base_url=gateway.url) as c,
    ):
        first = login(c)
        assert_token_shape(first, lifetime=600)
        clock.advance(599)
        renewed = c.post(TOKEN, content=refresh_form(first["refresh_token"]), headers=FORM)
        assert renewed.status_code == 200
        second = renewed.json()
        clock.advance(601)
        expired = c.post(TOKEN, content=refresh_form(second["refresh_token"]), headers=FORM)
        assert_oauth_error(expired)


# --- ClientTokens directly -------------------------------------------------------------------


def bearer(answer: TokenAnswer) -> str:
    assert answer.body is not None
    return "Bearer " + answer.body["access_token"]


def refresh_token_of(answer: TokenAnswer) -> str:
    assert answer.body is not None
    return str(answer.body["refresh_token"])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(clock: FakeClock) -> ClientTokens:
    return ClientTokens(lifetime_seconds=300, clock=clock)


def password_grant(tokens: ClientTokens, username: str = "nbia_guest") -> TokenAnswer:
    answer = tokens.answer_token_request(
        {"username": username, "password": "", "client_id": "NBIA", "grant_type": "password"}
    )
    assert answer.status == 200
    return answer


def test_unit_password_grant_shape_and_subject(tokens: ClientTokens) -> None:
    """A password grant returns NBIA's token fields with the configured lifetime, and the
    access token identifies the account that logged in."""
    answer = password_grant(tokens, "alice")
    assert answer.body is not None
    assert_token_shape(answer.body, lifetime=300)
    assert tokens.subject_of(bearer(answer)) == "alice"


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer undefined", "Basic bmJpYV9ndWVzdDo=", "Bearer nope"],
)
def test_unit_no_subject_without_a_valid_bearer_token(
    tokens: ClientTokens, authorization: str | None
) -> None:
    """Missing, malformed, foreign or non-bearer credentials identify nobody."""
    password_grant(tokens)
    assert tokens.subject_of(authorization) is None


def test_unit_bearer_scheme_is_case_insensitive(tokens: ClientTokens) -> None:
    """HTTP auth schemes are case-insensitive (RFC 9110 §11.1): "bearer <t>" works too."""
    answer = password_grant(tokens, "bob")
    token = bearer(answer).removeprefix("Bearer ")
    assert tokens.subject_of("bearer " + token) == "bob"


def test_unit_access_token_expires(tokens: ClientTokens, clock: FakeClock) -> None:
    """The access token is valid until its lifetime has passed, and not after."""
    answer = password_grant(tokens)
    clock.advance(299.9)
    assert tokens.subject_of(bearer(answer)) == "nbia_guest"
    clock.advance(0.2)
    assert tokens.subject_of(bearer(answer)) is None


def test_unit_refresh_rotates(tokens: ClientTokens) -> None:
    """A refresh issues a new pair for the same account and retires the old pair."""
    first = password_grant(tokens, "carol")
    second = tokens.answer_token_request(
        {"grant_type": "refresh_token", "refresh_token": refresh_token_of(first)}
    )
    assert second.status == 200
    assert tokens.subject_of(bearer(second)) == "carol"
    assert tokens.subject_of(bearer(first)) is None
    reused = tokens.answer_token_request(
        {"grant_type": "refresh_token", "refresh_token": refresh_token_of(first)}
    )
    assert 400 <= reused.status < 500 and reused.body is not None and "error" in reused.body


def test_unit_refresh_after_expiry_is_refused(tokens: ClientTokens, clock: FakeClock) -> None:
    """A refresh token is good for its lifetime only."""
    first = password_grant(tokens)
    clock.advance(300.1)
    answer = tokens.answer_token_request(
        {"grant_type": "refresh_token", "refresh_token": refresh_token_of(first)}
    )
    assert 400 <= answer.status < 500
    assert answer.body is not None and "access_token" not in answer.body


def test_unit_logout_revokes_the_session(tokens: ClientTokens) -> None:
    """Logout answers 204 without a body; then the token identifies nobody, a second logout
    gets 401 and the refresh token is refused."""
    answer = password_grant(tokens)
    assert tokens.answer_logout(bearer(answer)) == TokenAnswer(204, None)
    assert tokens.subject_of(bearer(answer)) is None
    second = tokens.answer_logout(bearer(answer))
    assert second.status == 401 and second.body is not None and "error" in second.body
    refreshed = tokens.answer_token_request(
        {"grant_type": "refresh_token", "refresh_token": refresh_token_of(answer)}
    )
    assert 400 <= refreshed.status < 500


def test_unit_logout_only_ends_its_own_session(tokens: ClientTokens) -> None:
    """Logging out one session leaves another session of the same account alone."""
    first, second = password_grant(tokens), password_grant(tokens)
    assert tokens.answer_logout(bearer(first)).status == 204
    assert tokens.subject_of(bearer(second)) == "nbia_guest"


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"grant_type": ""},
        {"grant_type": "client_credentials", "client_id": "nbia", "client_secret": "x"},
        {"grant_type": "authorization_code", "code": "x"},
        {"grant_type": "refresh_token"},
        {"grant_type": "refresh_token", "refresh_token": ""},
        {"grant_type": "refresh_token", "refresh_token": "forged"},
        {"grant_type": "password", "password": "x"},  # no username
    ],
    ids=lambda form: "&".join(f"{k}={v}" for k, v in form.items()) or "empty",
)
def test_unit_bad_requests_get_oauth_errors(tokens: ClientTokens, form: dict[str, str]) -> None:
    """Anything but a usable password or refresh grant gets a 4xx OAuth error and no token."""
    answer = tokens.answer_token_request(form)
    assert 400 <= answer.status < 500
    assert answer.body is not None
    assert isinstance(answer.body["error"], str)
    assert "access_token" not in answer.body


def test_unit_tokens_are_unique(tokens: ClientTokens) -> None:
    """Many logins never hand out the same access or refresh token twice."""
    answers = [password_grant(tokens) for _ in range(50)]
    access = {bearer(a) for a in answers}
    refresh = {refresh_token_of(a) for a in answers}
    assert len(access) == len(refresh) == 50


def test_open_mode_workers_on_one_database_share_tokens(tmp_path: Path) -> None:
    """Two open-mode gateways on one data dir (like `serve --workers 2`): a token issued by one
    is refreshed and logged out at the other."""
    settings = make_settings(tmp_path, UNREACHABLE)
    with GatewayServer(settings) as first, GatewayServer(settings) as second:
        with httpx.Client(base_url=first.url) as client:
            tokens = login(client)
        renewed = httpx.post(
            second.url + TOKEN, content=refresh_form(tokens["refresh_token"]), headers=FORM
        )
        assert renewed.status_code == 200
        out = httpx.post(
            first.url + LOGOUT,
            headers={"Authorization": "Bearer " + renewed.json()["access_token"]},
        )
        assert out.status_code == 204


def test_unit_the_memo_of_verified_tokens_is_bounded_and_keeps_the_recent_ones(
    tokens: ClientTokens, clock: FakeClock
) -> None:
    """Past its limit the memo drops the least recently used tokens, not all of them; and a
    memoized token still expires on time."""
    limit = client_tokens._MEMO_LIMIT
    answers = [password_grant(tokens, f"user{n}") for n in range(limit + 10)]
    for answer in answers:
        assert tokens.subject_of(bearer(answer)) is not None
    memo = tokens._memo
    assert len(memo) == limit
    assert bearer(answers[-1]).removeprefix("Bearer ") in memo
    assert bearer(answers[0]).removeprefix("Bearer ") not in memo
    clock.advance(300)
    assert tokens.subject_of(bearer(answers[-1])) is None

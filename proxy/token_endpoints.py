"""The gateway's own token and logout endpoints, answered locally in NBIA's shape.

A client's credentials are checked by the gateway and never forwarded: Tomcat treats
``/oauth/token/``, ``//oauth/token`` and other spellings as the token endpoint, so every
spelling is caught here (:func:`local_endpoint`) before anything could reach the upstream.
"""

from __future__ import annotations

import enum
import re
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from proxy.access import Access
from proxy.client_tokens import TokenAnswer
from proxy.endpoints import LOGOUT_PATHS, TOKEN_PATHS
from proxy.errors import ClientError
from proxy.headers import find
from proxy.request_body import read_body
from proxy.responses import GATEWAY_MADE, send_error, send_json, send_refusal

#: The largest token request body read (a form with a user name and a password).
_FORM_LIMIT = 64 * 1024
_SLASHES = re.compile("/+")


class LocalEndpoint(enum.Enum):
    """An endpoint the gateway answers itself."""

    TOKEN = "token"
    LOGOUT = "logout"


def local_endpoint(path: str) -> LocalEndpoint | None:
    """Which local endpoint ``path`` (below the upstream's mount) names, in any spelling."""
    local = _SLASHES.sub("/", path).rstrip("/").lower()
    if local in TOKEN_PATHS:
        return LocalEndpoint.TOKEN
    if local in LOGOUT_PATHS:
        return LocalEndpoint.LOGOUT
    return None


async def answer_local(
    endpoint: LocalEndpoint,
    access: Access,
    address: str,
    read_timeout: float,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> int:
    """Answer a token or logout request; return the status sent."""
    try:
        if endpoint is LocalEndpoint.TOKEN:
            answer = await _answer_token(access, read_timeout, scope, receive)
            # A locked-out address still logs in with valid credentials; wrong ones get 429.
            refusal = await access.login_failed(address) if answer.status == 401 else None
            if refusal is not None:
                await send_refusal(send, refusal)
                return refusal.status
        else:
            auth = find(scope["headers"], b"authorization")
            answer = access.tokens.answer_logout(auth.decode("latin-1") if auth else None)
    except ClientError as exc:
        await send_error(send, exc.status, exc.message)
        return exc.status
    await _send_answer(send, answer)
    return answer.status


async def _answer_token(
    access: Access, read_timeout: float, scope: Scope, receive: Receive
) -> TokenAnswer:
    method = scope["method"]
    body = await read_body(scope["headers"], receive, _FORM_LIMIT, read_timeout)
    if method == "POST":
        form = _form(body)
    elif method == "GET":  # tcia-utils 1.0 sent the grant as a query string
        form = _form(scope["query_string"])
    else:
        raise ClientError(f"method {method} is not supported here", status=405)
    return access.tokens.answer_token_request(form)


def _form(raw: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise ClientError("form body is not valid UTF-8") from exc
    return dict(pairs)


async def _send_answer(send: Send, answer: TokenAnswer) -> None:
    if answer.body is None:  # 204: no body, and no Content-Length either (RFC 9110 §8.6)
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": GATEWAY_MADE}
        )
        await send({"type": "http.response.body", "body": b""})
    else:
        await send_json(send, answer.status, answer.body, GATEWAY_MADE)

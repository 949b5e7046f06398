"""The gateway's errors, in one tree, and how transport failures are described.

* GatewayError            -- anything the gateway answers with its own JSON error (500)
  + UpstreamError         -- the upstream could not give a usable answer (502)
    - UpstreamUnreachable -- refused, DNS, TLS, or reset before a response (502)
    - UpstreamTimeout     -- connect or read time limit reached, or the gateway's deadline (504)
    - ServiceTokenError   -- the service account could not log in (502)
    - Overloaded          -- the gateway's own upstream queue is full or paused (503, Retry-After)
    - CircuitOpen         -- the breaker is open: the upstream is resting (503, Retry-After)
  + ClientError           -- the client's request is unusable (4xx, 400 unless told)
* StreamBroken            -- the upstream broke off after the answer started: no JSON error can
                             follow, so it propagates to the server, which aborts the connection
* AccountError            -- a ``users`` command that cannot be carried out (the CLI's message)

StreamBroken and AccountError are plain ``Exception`` subclasses on purpose: an ``except
GatewayError`` that answers with JSON must let them through.

Messages name the upstream host and the cause ("refused the connection", "could not resolve
the host name", "TLS handshake failed: ...", "did not answer within 120 s"); they never contain
tokens, passwords, query strings or request bodies.
"""

from __future__ import annotations

import socket
import ssl
from typing import Literal

import httpx

#: What an :class:`UpstreamTimeout` waited for: a connection, the answer (read) or for the
#: upstream to take the request (write), a free pooled connection of the gateway's own, or
#: something of the gateway's own making (the request deadline, offline mode).
TimeoutPhase = Literal["connect", "read", "write", "pool", "gateway"]


class GatewayError(Exception):
    """Base class: carries the HTTP status and a short, secret-free message."""

    status = 500
    retry_after: float | None = None  # seconds, sent as Retry-After when set

    def __init__(self, message: str, *, upstream: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.upstream = upstream

    def to_json(self) -> dict[str, str]:
        body = {"error": self.message}
        if self.upstream is not None:
            body["upstream"] = self.upstream
        return body


class UpstreamError(GatewayError):
    """The upstream failed to answer usefully."""

    status = 502


class UpstreamUnreachable(UpstreamError):
    """No connection, or the connection broke before a response arrived."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """The upstream did not connect or answer within the configured time."""

    status = 504

    def __init__(
        self, message: str, *, upstream: str | None = None, phase: TimeoutPhase = "gateway"
    ) -> None:
        super().__init__(message, upstream=upstream)
        self.phase = phase


class ServiceTokenError(UpstreamError):
    """The gateway's service account could not obtain an upstream token."""

    status = 502

    def __init__(
        self, message: str, *, upstream: str | None = None, upstream_status: int | None = None
    ) -> None:
        super().__init__(message, upstream=upstream)
        self.upstream_status = upstream_status  # what the token endpoint answered, if it did


class Overloaded(UpstreamError):
    """The gateway's own upstream queue is full (503 with Retry-After)."""

    status = 503

    def __init__(self, message: str, *, upstream: str, retry_after: float) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = retry_after


class CircuitOpen(UpstreamError):
    """The breaker is open: the upstream failed repeatedly and is resting (503)."""

    status = 503

    def __init__(self, message: str, *, upstream: str, retry_after: float) -> None:
        super().__init__(message, upstream=upstream)
        self.retry_after = retry_after


class ClientError(GatewayError):
    """The client sent something the gateway will not forward."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class StreamBroken(Exception):
    """The upstream failed after the response had started; the connection must be aborted."""


class AccountError(Exception):
    """A users command that cannot be carried out (unknown name, duplicate, bad name)."""


_TIMEOUT_PHASES: dict[type[httpx.TimeoutException], TimeoutPhase] = {
    httpx.ConnectTimeout: "connect",
    httpx.ReadTimeout: "read",
    httpx.WriteTimeout: "write",
    httpx.PoolTimeout: "pool",
}


def transport_error(
    exc: httpx.HTTPError, upstream: str, *, mid_body: bool = False, during: str = ""
) -> UpstreamError:
    """The gateway's error for an httpx failure talking to ``upstream``.

    The host and the configured time limits are read from the request the failure belongs to
    (``exc.request``), so the message says where and why: ``upstream <host> refused the
    connection``. ``mid_body``: the response had started already.
    ``during`` names what the gateway was doing, as a prefix: ``"service account login"``.
    """
    host, limits = _request_facts(exc, upstream)
    who = f"upstream {host}"
    prefix = f"{during}: " if during else ""
    if isinstance(exc, httpx.TimeoutException):
        phase: TimeoutPhase = "read"
        for kind, named in _TIMEOUT_PHASES.items():
            if isinstance(exc, kind):
                phase = named
        seconds = limits.get(phase)
        within = f"within {seconds:g} s" if seconds else "in time"
        if phase == "connect":
            message = f"{who} did not accept a connection {within}"
        elif phase == "write":
            message = f"{who} did not take the request {within}"
        elif phase == "pool":
            message = f"no free connection to {who} {within}"
        elif mid_body:
            message = f"{who} sent nothing more of the body {within}"
        else:
            message = f"{who} did not answer {within}"
        return UpstreamTimeout(prefix + message, upstream=upstream, phase=phase)
    if mid_body:
        return UpstreamUnreachable(
            f"{prefix}{who} broke off the response: {_break_reason(exc)}", upstream=upstream
        )
    return UpstreamUnreachable(prefix + who + _failure_reason(exc), upstream=upstream)


def _request_facts(exc: httpx.HTTPError, upstream: str) -> tuple[str, dict[str, float]]:
    """``host[:port]`` (never credentials, path or query) and the request's time limits."""
    try:
        request = exc.request
    except RuntimeError:  # raised without a request: only the upstream's name is known
        return upstream, {}
    limits = request.extensions.get("timeout", {})
    return host_label(request.url), {
        k: float(v) for k, v in limits.items() if isinstance(v, int | float)
    }


def host_label(url: httpx.URL) -> str:
    """``host[:port]`` of ``url`` for a message: never credentials, path or query."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first (bounded, cycles cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _failure_reason(exc: httpx.HTTPError) -> str:
    """Why no answer arrived, as the rest of a sentence that starts with the host."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = f" ({cause.verify_message})" if cause.verify_message else ""
            return f": TLS handshake failed: certificate verify failed{detail}"
        if isinstance(cause, ssl.SSLError):
            reason = (cause.reason or cause.strerror or type(cause).__name__).lower()
            return f": TLS handshake failed: {reason.replace('_', ' ')}"
        if isinstance(cause, socket.gaierror):
            detail = f" ({cause.strerror})" if cause.strerror else ""
            return f": could not resolve the host name{detail}"
        if isinstance(cause, ConnectionRefusedError):
            return " refused the connection"
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return " reset the connection"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        if "disconnect" in text or "closed" in text:
            return " closed the connection without answering"
        return " sent an invalid response"
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return f" could not be reached: {cause.strerror.lower()}"
    return f" could not be reached ({type(exc).__name__})"


def _break_reason(exc: httpx.HTTPError) -> str:
    for cause in _causes(exc):
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return "connection reset"
        if isinstance(cause, ssl.SSLError):
            return "TLS error"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        if "closed" in text or "incomplete" in text or "disconnect" in text:
            return "connection closed before the body ended"
        return "invalid response"
    return f"connection broken ({type(exc).__name__})"

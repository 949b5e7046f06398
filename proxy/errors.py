"""Errors the gateway turns into short JSON answers.

* GatewayError                 -- anything the gateway answers with its own JSON error
  + UpstreamError              -- the upstream could not give a usable answer
    - UpstreamUnreachable      -- connection refused, DNS failure, reset before a response (502)
    - UpstreamTimeout          -- connect or read time limit reached (504)
    - ServiceTokenError        -- the service account could not log in (502)
  + ClientError                -- the client's request is unusable (4xx)

Messages never contain tokens, passwords or request bodies.
"""

from __future__ import annotations


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


class ServiceTokenError(UpstreamError):
    """The gateway's service account could not obtain an upstream token."""

    status = 502


class ClientError(GatewayError):
    """The client sent something the gateway will not forward."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

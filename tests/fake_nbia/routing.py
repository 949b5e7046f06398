"""Request model and the route table (generation + resource name -> handler)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .responses import Reply, bad_request, missing

if TYPE_CHECKING:
    from .app import FakeNBIA

Generation = Literal["v4", "v1", "v2", "root", "auth"]


@dataclass
class LoggedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: str  # raw query string, decoded latin-1
    headers: dict[str, str]  # lower-case names
    body: bytes
    user: str | None = None  # identity the request was answered for (after auth)


@dataclass
class Call:
    """A routed request, handed to the handler."""

    fake: FakeNBIA
    log: LoggedRequest
    generation: Generation
    name: str
    query: list[tuple[str, str]]
    form: list[tuple[str, str]]
    user: str | None = None

    @property
    def params(self) -> list[tuple[str, str]]:
        """The parameters the resource reads: the form for POST, else the query."""
        return self.form if self.log.method == "POST" else self.query

    def get(self, name: str) -> str | None:
        """First value of parameter `name` (JAX-RS names are case-sensitive)."""
        return next((v for k, v in self.params if k == name), None)

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.params if k == name]

    def require(self, name: str) -> str:
        """A required parameter; missing or empty is the server's 400 sentence."""
        value = self.get(name)
        if not value:
            raise missing(name)
        return value

    def bearer(self) -> str | None:
        return self.log.headers.get("authorization")


Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Route:
    method: str  # GET or POST (JAX-RS adds HEAD/OPTIONS for GET)
    handler: Handler
    allowed: tuple[str, ...] | None  # v4 strict allow-list, None = not checked


ROUTES: dict[tuple[Generation, str], Route] = {}


def route(
    generation: Generation, name: str, method: str = "GET", allowed: tuple[str, ...] | None = None
) -> Callable[[Handler], Handler]:
    """Register a handler; stack the decorator to serve several generations."""

    def register(fn: Handler) -> Handler:
        ROUTES[(generation, name)] = Route(method, fn, allowed)
        return fn

    return register


def check_allowed(call: Call, allowed: tuple[str, ...]) -> None:
    """v4's strict allow-list: any unexpected parameter is a 400."""
    kind = "form" if call.log.method == "POST" else "query"
    for key, _ in call.params:
        if key not in allowed:
            raise bad_request(
                f"Invalid {kind} parameter: '{key}'. Allowed parameters are: [{', '.join(allowed)}]"
            )


def resolve(path: str) -> tuple[Generation, str] | None:
    """Map a URL path to (generation, resource name).

    Jersey is mounted at /nbia-api/services/* and, in the Keycloak build, also at
    /nbia-api/*; the token and logout resources live next to the others.
    """
    prefix = "/nbia-api/"
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :]
    if rest.startswith("services/"):
        rest = rest[len("services/") :]
    if rest in ("oauth/token", "logout"):
        return "auth", rest
    head, _, tail = rest.partition("/")
    if tail and head in ("v1", "v2", "v4") and "/" not in tail:
        return head, tail  # type: ignore[return-value]
    if not tail and head:
        return "root", head
    return None

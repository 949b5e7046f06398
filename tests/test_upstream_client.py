"""The upstream client's per-request work: what a cache miss pays besides the upstream's time."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx

from proxy.upstream import Upstream, upstream_configs
from tests.fake_nbia import FakeServer
from tests.gateway_server import make_settings

# Audit hooks cannot be removed: this one only records while a test asks it to.
_IMPORTS: list[str] | None = None


def _record_imports(event: str, args: tuple[Any, ...]) -> None:
    if event == "import" and _IMPORTS is not None:
        _IMPORTS.append(str(args[0]))


sys.addaudithook(_record_imports)


def test_a_request_through_the_upstream_client_imports_nothing(
    tmp_path: Path, nbia_upstream: FakeServer
) -> None:
    # httpcore asks `import sniffio` on every request: an import that fails searches the whole
    # path again each time (a quarter of a cache miss's CPU when sniffio was not installed).
    settings = make_settings(tmp_path, nbia_upstream.url)
    upstream = Upstream(upstream_configs(settings)[-1], settings)
    url = upstream.url_for(b"/nbia-api/services/v4/getCollectionValues", b"")

    async def two_requests() -> list[str]:
        global _IMPORTS
        try:
            assert (await upstream.client.get(url)).status_code == 200  # first use may import
            _IMPORTS = []
            assert (await upstream.client.get(url)).status_code == 200
            return _IMPORTS
        finally:
            _IMPORTS = None
            await upstream.aclose()

    assert asyncio.run(two_requests()) == []


def test_a_cookie_the_upstream_sets_never_rides_along_with_the_next_request(
    tmp_path: Path,
) -> None:
    """The client is shared by every user: Tomcat's JSESSIONID for one must not reach others."""
    sent: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"set-cookie": "JSESSIONID=abc123; Path=/"})

    settings = make_settings(tmp_path, "http://nbia.example")
    config = upstream_configs(settings)[-1]
    upstream = Upstream(config, settings, transport=httpx.MockTransport(answer))

    async def three_requests() -> None:
        try:
            for _ in range(3):
                await upstream.client.get(upstream.url_for(b"/nbia-api/services/v4/x", b""))
        finally:
            await upstream.aclose()

    asyncio.run(three_requests())
    assert sent == [None, None, None]
    assert not upstream.client.cookies

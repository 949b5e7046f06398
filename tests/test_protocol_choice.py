"""The protocol uvicorn runs: HitProtocol on the pinned uvicorn, uvicorn's own when a private
name HitProtocol builds on is gone (one warning, and the gateway still serves, hits included)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy import protocol_choice
from proxy.config import Settings
from proxy.server import uvicorn_options
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

SERIES = "/nbia-api/services/v4/getSeries?Collection=TCGA-KIRC&Modality=MR"


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    protocol_choice.http_protocol.cache_clear()
    yield
    protocol_choice.http_protocol.cache_clear()


def test_the_installed_uvicorn_has_every_name_and_runs_hit_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    assert protocol_choice.missing_names() == []
    assert uvicorn_options(Settings())["http"] == "proxy.hit_protocol:HitProtocol"
    assert caplog.records == []


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (HttpToolsProtocol, "_unsupported_upgrade_warning"),  # a method it calls
        (HttpToolsProtocol, "timeout_keep_alive_handler"),  # a method it overrides
    ],
)
def test_a_missing_method_is_named(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    monkeypatch.delattr(owner, name)
    assert protocol_choice.missing_names() == [
        f"uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.{name}"
    ]


def test_an_attribute_no_longer_assigned_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance attribute counts as present when the class's code assigns it."""
    needed = protocol_choice.NEEDED["uvicorn.server"]
    monkeypatch.setitem(needed, "ServerState", ("total_requests", "requests_in_total"))
    assert protocol_choice.missing_names() == ["uvicorn.server.ServerState.requests_in_total"]


def test_a_missing_class_or_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(protocol_choice.NEEDED, "uvicorn.no_such_module", {"X": ("y",)})
    monkeypatch.setitem(protocol_choice.NEEDED["uvicorn.server"], "NoSuchClass", ("z",))
    assert protocol_choice.missing_names() == [
        "uvicorn.server.NoSuchClass",
        "uvicorn.no_such_module",
    ]


def test_without_a_needed_name_the_gateway_serves_on_uvicorns_protocol(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    nbia_upstream: FakeServer,
) -> None:
    """One warning naming what is missing; cache hits then come through the ASGI path."""
    caplog.set_level(logging.WARNING, logger="nbia_proxy.server")
    monkeypatch.delattr(HttpToolsProtocol, "_unsupported_upgrade_warning")
    settings = make_settings(tmp_path, nbia_upstream.url)
    assert uvicorn_options(settings)["http"] == "httptools"
    with GatewayServer(settings) as gateway:  # builds its options again: no second warning
        first = httpx.get(gateway.url + SERIES, timeout=10)
        second = httpx.get(gateway.url + SERIES, timeout=10)
    assert (first.status_code, first.headers["x-cache"]) == (200, "MISS")
    assert (second.status_code, second.headers["x-cache"]) == (200, "HIT")
    assert second.content == first.content
    assert gateway.app.shortcut_hits == 0
    warnings = [r for r in caplog.records if r.name == "nbia_proxy.server"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "HttpToolsProtocol._unsupported_upgrade_warning" in message
    assert "httptools" in message

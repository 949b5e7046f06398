"""The end of a zip reaches no client before the zip is checked.

NBIA's zip writer closes a zip cleanly when it fails, so a short or corrupt series arrives as a
well-formed zip. The gateway holds the last chunk (which holds the zip's end record) back from
every reader until the verdict: when the check fails, no client has the end record, whatever it
does with the bytes it got (a client that ignores the broken transfer still holds no zip that
opens as complete). tests/test_series_cache.py checks that the transfer is aborted; this checks
that the end never left the gateway, for the first client and for one that joined the fill.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer, make_settings

S = "/nbia-api/services"
END_RECORD = b"PK\x05\x06"  # the zip's end of central directory record


@pytest.fixture
def gw(tmp_path: Path, nbia_upstream: FakeServer) -> Iterator[GatewayServer]:
    with GatewayServer(make_settings(tmp_path, nbia_upstream.url)) as server:
        yield server


def received_until_broken(url: str) -> tuple[bytes, bool]:
    """The body bytes a client got, and whether its transfer broke (rather than ending)."""
    got = bytearray()
    try:
        with httpx.stream("GET", url, timeout=60) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                got += chunk
    except httpx.HTTPError:
        return bytes(got), True
    return bytes(got), False


@pytest.mark.parametrize(
    ("endpoint", "fault"),
    [
        ("v4/getImage", lambda fake: fake.close_zip_after(1, times=1)),
        ("v4/getImageWithMD5Hash", lambda fake: fake.alter_image(1, times=1)),
    ],
    ids=["short-zip", "altered-image"],
)
def test_no_reader_gets_the_end_of_a_zip_that_fails_its_check(
    gw: GatewayServer, nbia_upstream: FakeServer, endpoint: str, fault: Callable[[Any], None]
) -> None:
    uid = next(s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung")
    url = f"{gw.url}{S}/{endpoint}?SeriesInstanceUID={uid}"
    # The head comes late, so that a second reader joins the fill before any byte of it.
    nbia_upstream.app.slow(seconds_before_headers=1.0, path_contains="getImage")
    fault(nbia_upstream.app)
    results: list[tuple[bytes, bool]] = []
    readers = [
        threading.Thread(target=lambda: results.append(received_until_broken(url)))
        for _ in range(2)
    ]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert gw.app.series is not None
    assert gw.app.series.fills.counters.joined == 1  # the second reader read the same fill
    assert len(nbia_upstream.app.requests_to(f"/{endpoint}")) == 1
    for got, broken in results:
        assert broken
        assert END_RECORD not in got

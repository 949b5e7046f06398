"""tcia-utils 3.3.5, a real client nobody here wrote, end to end through the gateway.

Each call is made twice, once through the gateway and once straight at the fake upstream, and
the results must be equal. tcia-utils builds its URLs with ``nbia.setApiUrl``; the tests swap
that function with monkeypatch so that nothing leaks between tests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tcia_utils import nbia

from proxy.tcia import gateway_url_builder, use_gateway
from tests.fake_nbia import FakeServer
from tests.gateway_server import GatewayServer


def _both(
    monkeypatch: pytest.MonkeyPatch, gateway: str, direct: str, call: Callable[[], Any]
) -> tuple[Any, Any]:
    """Run ``call`` through the gateway, then directly against the upstream."""
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gateway))
    through = call()
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(direct))
    return through, call()


def test_get_collections(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    through, direct = _both(monkeypatch, gateway.url, nbia_upstream.url, nbia.getCollections)
    assert through == direct
    assert {"Collection": "4D-Lung"} in through
    assert len(nbia_upstream.app.requests_to("/v4/getCollectionValues")) == 2


def test_get_series_with_filters(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    through, direct = _both(
        monkeypatch,
        gateway.url,
        nbia_upstream.url,
        lambda: nbia.getSeries(collection="TCGA-KIRC", modality="MR"),
    )
    assert through == direct
    assert through and all(row["Modality"] == "MR" for row in through)


def test_get_series_list_posts_and_parses_csv(
    monkeypatch: pytest.MonkeyPatch,
    gateway: GatewayServer,
    nbia_upstream: FakeServer,
) -> None:
    """getSeriesList is a form POST to v4/getSeriesMetadata whose CSV pandas parses."""
    uids = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"][:3]
    through, direct = _both(
        monkeypatch, gateway.url, nbia_upstream.url, lambda: nbia.getSeriesList(uids)
    )
    assert through is not None and direct is not None
    assert through.equals(direct)
    assert len(through) == 3
    posts = nbia_upstream.app.requests_to("/v4/getSeriesMetadata")
    assert [p.method for p in posts] == ["POST", "POST"]
    assert posts[0].body == posts[1].body


def test_get_simple_search(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    through, direct = _both(
        monkeypatch,
        gateway.url,
        nbia_upstream.url,
        lambda: nbia.getSimpleSearch(collections=["4D-Lung"], modalities=["CT"]),
    )
    assert through == direct
    assert through["totalPatients"] >= 1


def test_get_shared_cart_goes_to_v1(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    through, direct = _both(
        monkeypatch,
        gateway.url,
        nbia_upstream.url,
        lambda: nbia.getSharedCart("nbia-49121659384603347"),
    )
    assert through == direct and through
    assert len(nbia_upstream.app.requests_to("/v1/getContentsByName")) == 2


def _tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_download_series_zip(
    monkeypatch: pytest.MonkeyPatch,
    gateway: GatewayServer,
    nbia_upstream: FakeServer,
    tmp_path: Path,
) -> None:
    """downloadSeries fetches zips (getImage) and unpacks them: same files, same bytes."""
    uids = [s.uid for s in nbia_upstream.app.dataset.series if s.collection == "4D-Lung"][:2]
    through_dir, direct_dir = tmp_path / "through", tmp_path / "direct"
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gateway.url))
    nbia.downloadSeries(uids, input_type="list", path=str(through_dir))
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(nbia_upstream.url))
    nbia.downloadSeries(uids, input_type="list", path=str(direct_dir))
    assert len(nbia_upstream.app.requests_to("/v4/getImage")) == 4
    through, direct = _tree(through_dir), _tree(direct_dir)
    assert through == direct
    assert sum(name.endswith(".dcm") for name in through) >= 4
    assert any(name.endswith("LICENSE") for name in through)


def test_nlst_is_routed_to_the_nlst_mount(
    monkeypatch: pytest.MonkeyPatch,
    gateway: GatewayServer,
    nbia_upstream: FakeServer,
    nlst_upstream: FakeServer,
) -> None:
    monkeypatch.setattr(nbia, "setApiUrl", gateway_url_builder(gateway.url))
    through = nbia.getCollections(api_url="nlst")
    assert through == [{"Collection": "NLST"}]
    assert len(nlst_upstream.app.requests_to("/v4/getCollectionValues")) == 1
    assert nbia_upstream.app.requests_to("/v4/getCollectionValues") == []


def test_use_gateway_is_one_call(
    monkeypatch: pytest.MonkeyPatch, gateway: GatewayServer, nbia_upstream: FakeServer
) -> None:
    """The documented one-liner routes every tcia-utils call through the gateway."""
    monkeypatch.setattr(nbia, "setApiUrl", nbia.setApiUrl)  # restored after the test
    use_gateway(gateway.url)
    assert nbia.setApiUrl("getSeries") == f"{gateway.url}/nbia-api/services/v4/"
    assert nbia.setApiUrl("getContentsByName", "nlst") == (
        f"{gateway.url}/nlst/nbia-api/services/v1/"
    )
    with pytest.raises(ValueError, match="Invalid api_url"):
        nbia.setApiUrl("getSeries", "idc")
    assert nbia.getCollections()
    assert len(nbia_upstream.app.requests_to("/v4/getCollectionValues")) == 1

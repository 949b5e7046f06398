"""The README stays true (its opening commands and its settings table), and /docs works with
no network (its assets are the gateway's own)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

from proxy.app import DOCS_ASSETS
from proxy.config import Settings, load_settings
from tests.browser import chromium, off_the_machine, requested_urls, screenshot
from tests.gateway_server import GatewayServer, make_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    text = README.read_text()
    rows = set(re.findall(r"^\| `([a-z_0-9]+)` \| `NBIA_PROXY_([A-Z_0-9]+)` \|", text, re.M))
    for name in Settings.model_fields:
        assert (name, name.upper()) in rows, f"setting {name} is missing from the README table"
    assert len(rows) == len(Settings.model_fields), "the README documents a setting that is gone"


def test_readme_opens_with_the_serve_and_test_commands() -> None:
    """The first code block holds the command that starts the gateway and the one that tests."""
    first_block = README.read_text().split("```")[1]
    assert "nbia-proxy serve" in first_block
    assert "bash scripts/test" in first_block
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test" in ci


def test_the_example_settings_file_is_valid() -> None:
    example = README.parent / "deploy" / "nbia-proxy.example.toml"
    settings = load_settings(example)
    assert settings.cache_ttl == {"v4/getSeries*": 86400, "*getSimpleSearch*": 300}
    assert settings.cache_max_bytes == 4 * 1024**3


def _docs_gateway(tmp_path: Path) -> GatewayServer:
    # The upstream is never asked: /docs and its assets are the gateway's own.
    return GatewayServer(make_settings(tmp_path, "http://127.0.0.1:9", cache_enabled=False))


def test_docs_loads_its_assets_from_the_gateway(tmp_path: Path) -> None:
    """The page names only the gateway's own paths, and the gateway serves each of them."""
    with _docs_gateway(tmp_path) as gw:
        page = httpx.get(gw.url + "/docs", timeout=30)
        assert page.status_code == 200
        referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert referenced and all(url.startswith(DOCS_ASSETS) for url in referenced), referenced
        assert "cdn" not in page.text.lower() and "https://" not in page.text
        for url in referenced:
            asset = httpx.get(gw.url + url, timeout=30)
            assert asset.status_code == 200 and len(asset.content) > 500, url
        # Only the three files: no other file of the package, and no path from the request.
        for other in ("index.html", "swagger-initializer.js", "..%2F..%2Fapp.py"):
            assert httpx.get(f"{gw.url}{DOCS_ASSETS}{other}", timeout=30).status_code == 404
        assert httpx.get(gw.url + "/redoc", timeout=30).status_code == 404  # ReDoc needs a CDN


def test_docs_renders_in_a_browser_with_no_network(tmp_path: Path) -> None:
    """Chromium, resolving no host but the loopback one, renders the control endpoints, and
    every request it made stayed on this machine."""
    with _docs_gateway(tmp_path) as gw, chromium() as browser:
        browser.get(gw.url + "/docs")
        WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
        )
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/_proxy/status", "/healthz", "/_proxy/cache/stats"} <= {
            p.replace("\u200b", "") for p in paths
        }
        urls = requested_urls(browser)
        screenshot(browser, "docs")
    assert any(url.endswith("/openapi.json") for url in urls), urls
    assert off_the_machine(urls) == []

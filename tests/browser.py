"""Headless Chromium for the tests, driven by Selenium through Debian's chromedriver.

Nothing is downloaded: the browser and the driver are the system's (``apt-get install chromium
chromium-driver``), given to Selenium by path, and Selenium Manager is told to stay offline.
Without them the browser tests skip, except where ``NBIA_PROXY_TEST_REQUIRE_BROWSER=1`` (CI):
there they fail. The browser resolves no host name but the loopback address, and every request
it made can be listed (:func:`requested_urls`), so a test can show that a page needs nothing
from the internet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

CHROMIUM = Path(os.environ.get("NBIA_PROXY_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("NBIA_PROXY_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
#: Screenshots and pages the browser tests leave (ignored by git).
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@contextmanager
def chromium() -> Iterator[Chrome]:
    """A headless Chromium session (skips, or fails in CI, when there is no browser)."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("NBIA_PROXY_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser tests need Chromium: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1800",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        # No name resolves but the loopback address: anything from the internet would fail.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Chrome) -> list[str]:
    """Every URL the browser asked for since the last call (from its performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def off_the_machine(urls: list[str]) -> list[str]:
    """The URLs among ``urls`` that are not on the loopback address (nor inline data)."""
    return [
        url
        for url in urls
        if urlsplit(url).scheme not in ("data", "blob", "about")
        and urlsplit(url).hostname not in ("127.0.0.1", "localhost")
    ]


def screenshot(driver: Chrome, name: str) -> Path:
    """Save the page as ``test-artifacts/<name>.png`` and say where (pytest -s shows it)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path

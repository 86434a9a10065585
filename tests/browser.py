"""A real headless browser for the tests that look at a page as a person would (tests/test_html_report.py).

Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them where missing), driven by selenium;
nothing is downloaded. The browser runs with a fresh profile and no network beyond loopback (background
networking, component updates and sync are off; the pages opened are ``file://`` URLs). When no browser can be
had, :func:`browser` skips the test and says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--hide-scrollbars",
                  "--force-color-profile=srgb",  # screenshot pixels = CSS colours
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost")  # no name resolves: no network


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


@contextlib.contextmanager
def browser() -> Iterator[object]:
    """A selenium Chrome driver on Debian's chromium, quit at the end; ``pytest.skip`` with the reason when
    selenium, chromium or chromedriver is missing or the browser does not start."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no headless browser: the selenium package is not installed (pip install -e '.[test]')")
    chromium = _find(os.environ.get("SEGCLI_CHROMIUM", ""), "chromium", "/usr/bin/chromium", "chromium-browser")
    driver_path = _find(os.environ.get("SEGCLI_CHROMEDRIVER", ""), "chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; .ci/run does)")
    profile = tempfile.mkdtemp(prefix="segcli-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"no headless browser: chromium did not start ({str(exc).splitlines()[0][:200]})")
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    """Console messages of level SEVERE (JavaScript errors, blocked fetches, CSP violations)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def file_url(path: Path) -> str:
    return Path(path).resolve().as_uri()

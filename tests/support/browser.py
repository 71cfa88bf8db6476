"""Debian's Chromium for the browser tests, launched the one way that works
offline here: never a downloaded browser, no background network.

- `chromium()`: the browser (Playwright, headless); a missing Chromium fails
  the test with how to install it.
- `static_page()`: a page at `ORIGIN` whose scripts are the checkout's
  static/ files, served by Playwright under a strict CSP like the site's: for
  testing the front-end modules without a server.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.processes import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

STATIC = ROOT / "static"
ORIGIN = "http://breezeweb.test"
PAGE = """<!doctype html><html><head>
<meta http-equiv="Content-Security-Policy" content="default-src 'self'; script-src 'self'">
</head><body><div id="out"></div></body></html>"""


@contextmanager
def chromium():
    """Headless Debian Chromium through Playwright (sync API), closed after."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make chromium` installs it", pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


def _serve_static(route) -> None:
    path = route.request.url.removeprefix(ORIGIN)
    if path == "/":
        route.fulfill(status=200, body=PAGE, content_type="text/html")
        return
    file = (STATIC / path.removeprefix("/static/")).resolve()
    if STATIC not in file.parents or not file.is_file():
        route.fulfill(status=404, body="")
        return
    kind = "text/javascript" if file.suffix in (".js", ".mjs") else None
    kind = kind or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    route.fulfill(status=200, body=file.read_bytes(), content_type=kind)


@contextmanager
def static_page() -> Iterator:
    """A page showing `PAGE` (an empty `#out`), its modules imported from
    /static/ as the site ships them."""
    with chromium() as browser:
        page = browser.new_page()
        page.route(f"{ORIGIN}/**", _serve_static)
        page.goto(f"{ORIGIN}/")
        yield page

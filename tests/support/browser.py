"""Debian's Chromium for the browser tests, launched the one way that works
offline here: never a downloaded browser, no background network.

- `chromium()`: the browser (Playwright, headless); a missing Chromium fails
  the test with how to install it.
- `sign_in(page, site_url, username, password)`: through the login form.
- `watched_page(context)`: a page that records console errors, page errors
  and failed requests in `page.problems`.
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


def sign_in(
    page,
    site_url: str,
    username: str,
    password: str,
    *,
    admin: bool = False,
    then: str | None = None,
    timeout: float = 30_000,
) -> None:
    """Sign in through the login form (the admin's with `admin`) and wait for
    `then`: by default the chat's socket open, or the admin's index."""
    page.goto(f"{site_url}/admin/login/" if admin else f"{site_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]" if admin else "button[type=submit]")
    then = then or ("#content-main" if admin else "#conn-status[data-state=open]")
    page.wait_for_selector(then, timeout=timeout)


def watched_page(context, console: tuple[str, ...] = ("error",)):
    """A new page of `context` that records in `page.problems` what a clean
    page never shows: console messages of the `console` types (CSP violations
    among them), page errors, responses of 400 and over and failed requests."""
    page = context.new_page()
    page.problems = []
    page.on(
        "console",
        lambda m: (
            page.problems.append(f"console {m.type}: {m.text} {m.location.get('url', '')}")
            if m.type in console
            else None
        ),
    )
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on(
        "response",
        lambda r: page.problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )
    # A request the browser itself cancels (ERR_ABORTED: the page navigated away
    # while an icon loaded) is not a failure of the site.
    page.on(
        "requestfailed",
        lambda r: (
            page.problems.append(f"failed {r.url}: {r.failure}")
            if "ERR_ABORTED" not in (r.failure or "")
            else None
        ),
    )
    return page


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

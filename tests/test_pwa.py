"""Installing as an app (breezeweb/pwa.py, docs/accessibility.md): the favicon,
the manifest and the service worker are served from the root, and the worker
caches the app shell only, under a name that changes with the shell's files.
The browser side (registration, control, cache contents) is in
tests/test_accessibility_browser.py."""

from __future__ import annotations

import json
import re

import pytest

from breezeweb import pwa

pytestmark = pytest.mark.django_db


def _shell_of(body: str) -> tuple[str, list[str]]:
    version = re.search(r'const VERSION = "([0-9a-f]+)";', body).group(1)
    shell = json.loads(re.search(r"const SHELL = (\[.*?\]);", body).group(1))
    return version, shell


@pytest.fixture
def fresh_shell():
    pwa.shell.cache_clear()
    yield
    pwa.shell.cache_clear()


def test_the_favicon_is_at_the_root(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response["Content-Type"] == "image/x-icon"
    assert b"".join(response.streaming_content)[:4] == b"\x00\x00\x01\x00"  # an ICO header


def test_the_manifest_describes_an_installable_app_in_the_page_language(
    client, compiled_translations
):
    response = client.get("/manifest.webmanifest", HTTP_ACCEPT_LANGUAGE="en")
    assert response["Content-Type"] == "application/manifest+json"
    manifest = response.json()
    assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
    assert manifest["scope"] == "/" and manifest["lang"] == "en"
    sizes = {icon["sizes"] for icon in manifest["icons"]}
    assert {"192x192", "512x512"} <= sizes
    for icon in manifest["icons"]:
        assert client.get(icon["src"]).status_code == 200
    chinese = client.get("/manifest.webmanifest", HTTP_ACCEPT_LANGUAGE="zh-TW").json()
    assert chinese["lang"] == "zh-hant" and chinese["description"] != manifest["description"]


def test_the_worker_is_served_fresh_from_the_root_and_caches_only_the_shell(client, fresh_shell):
    response = client.get("/sw.js")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/javascript")
    assert response["Cache-Control"] == "no-cache"
    body = response.content.decode()
    version, shell = _shell_of(body)
    assert len(version) == 16
    assert {"/static/js/chat.js", "/static/css/app.css", "/static/icons/icon-192.png"} <= set(shell)
    assert all(url.startswith("/static/") for url in shell)
    assert not [u for u in shell if "axe-core" in u or u.endswith((".map", ".md", "LICENSE"))]
    # It answers only GETs for those exact paths: nothing else is ever intercepted.
    assert "SHELL_PATHS.has(url.pathname)" in body and 'request.method !== "GET"' in body


def test_the_cache_name_changes_with_the_shell_files(settings, tmp_path, fresh_shell):
    (tmp_path / "css").mkdir()
    style = tmp_path / "css" / "app.css"
    style.write_text("body { color: black; }")
    settings.STATICFILES_DIRS = [tmp_path]
    first, urls = pwa.shell()
    assert urls == ["/static/css/app.css"]
    pwa.shell.cache_clear()
    assert pwa.shell()[0] == first  # same files, same version
    style.write_text("body { color: navy; }")
    pwa.shell.cache_clear()
    assert pwa.shell()[0] != first

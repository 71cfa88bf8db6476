"""Installing the chat as an app: the favicon, the web app manifest and the
service worker, all served from the site root (a service worker controls only
the paths under its own URL, and browsers ask for /favicon.ico on pages that
name no icon, such as the admin's).

The service worker caches the app shell only: the site's own stylesheets,
scripts, vendored libraries and icons. Pages, answers, documents and API
responses always come from the network. Its script carries a hash of the shell
files, so any change to one of them installs a new worker that drops the old
cache."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

from django.conf import settings
from django.http import FileResponse, HttpResponse, JsonResponse
from django.template.loader import render_to_string
from django.templatetags.static import static
from django.urls import reverse
from django.utils.translation import get_language, get_language_bidi, gettext
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET

# Folders of static/ that make up the shell; files a page never loads are left out.
SHELL_FOLDERS = ("css", "js", "icons", "vendor")
SHELL_SKIPPED_SUFFIXES = (".map", ".md", ".svg~")
SHELL_SKIPPED_NAMES = ("LICENSE", "LICENSE-3RD-PARTY.txt")
TEST_ONLY_VENDOR = ("axe-core-",)  # the accessibility audit's engine: tests inject it
THEME_COLOR = "#1d4ed8"


def _static_root() -> Path:
    return Path(settings.STATICFILES_DIRS[0])


def _shell_files() -> list[Path]:
    root = _static_root()
    files = []
    for folder in SHELL_FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root)
            if (
                path.is_file()
                and not path.name.endswith(SHELL_SKIPPED_SUFFIXES)
                and path.name not in SHELL_SKIPPED_NAMES
                and not any(part.startswith(TEST_ONLY_VENDOR) for part in rel.parts)
            ):
                files.append(path)
    return files


@cache
def shell() -> tuple[str, list[str]]:
    """(version, URLs) of the app shell: the version is a hash of the files'
    names and contents, computed once per process (files change with a deploy,
    which restarts the process)."""
    root = _static_root()
    digest = hashlib.sha256()
    urls = []
    for path in _shell_files():
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
        urls.append(static(rel))
    return digest.hexdigest()[:16], urls


@require_GET
@cache_control(max_age=86400, public=True)
def favicon(request):
    return FileResponse(
        (_static_root() / "icons" / "favicon.ico").open("rb"), content_type="image/x-icon"
    )


@require_GET
def manifest(request):
    """The web app manifest, in the page's language."""
    data = {
        "id": "/",
        "name": "BreezeWeb",
        "short_name": "BreezeWeb",
        "description": gettext("Chat with your team's models and documents."),
        "lang": get_language(),
        "dir": "rtl" if get_language_bidi() else "ltr",
        "start_url": reverse("chat"),
        "scope": "/",
        "display": "standalone",
        "background_color": "#ffffff",
        "theme_color": THEME_COLOR,
        "icons": [
            {"src": static("icons/icon-192.png"), "sizes": "192x192", "type": "image/png"},
            {"src": static("icons/icon-512.png"), "sizes": "512x512", "type": "image/png"},
            {
                "src": static("icons/maskable-512.png"),
                "sizes": "512x512",
                "type": "image/png",
                "purpose": "maskable",
            },
            {"src": static("icons/icon.svg"), "sizes": "any", "type": "image/svg+xml"},
        ],
        "shortcuts": [{"name": gettext("New chat"), "url": reverse("chat")}],
    }
    return JsonResponse(
        data, content_type="application/manifest+json", json_dumps_params={"ensure_ascii": False}
    )


@require_GET
def service_worker(request):
    version, urls = shell()
    script = render_to_string(
        "pwa/service-worker.js", {"version": version, "shell_json": json.dumps(urls)}
    )
    response = HttpResponse(script, content_type="text/javascript; charset=utf-8")
    # Browsers check for a new worker on navigation; never let a cache hide one.
    response["Cache-Control"] = "no-cache"
    return response

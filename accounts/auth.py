"""Who is calling over HTTP: an API key (`Authorization: Bearer`) or the
browser's session, and whether a session's request comes from an allowed
origin (scheme, host and port compared exactly).

CSRF: a key-authenticated request carries no cookie, so it is exempt; a
session-authenticated one is checked exactly like a form post.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest
from django.middleware.csrf import CsrfViewMiddleware


def _bearer(header: str) -> str:
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return ""


def bearer_key(request: HttpRequest) -> str:
    """The raw API key of `Authorization: Bearer <key>`, or ""."""
    return _bearer(request.headers.get("Authorization", ""))


def scope_has_bearer_key(scope: dict) -> bool:
    """Whether an ASGI request's headers carry an API key, read as
    `bearer_key` reads it (before Django has made a request of them)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            return bool(_bearer(value.decode("latin-1")))
    return False


def normalized_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, default ports filled in; None when
    it is not an http(s) origin (`null`, garbage)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def allowed_origins(request: HttpRequest) -> set[tuple[str, str, int]]:
    """The site's own origin (as this request reached it) and CSRF_TRUSTED_ORIGINS."""
    origins = set()
    scheme = "https" if request.is_secure() else "http"
    try:
        own = normalized_origin(f"{scheme}://{request.get_host()}")
    except DisallowedHost:
        own = None
    if own:
        origins.add(own)
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        parsed = normalized_origin(trusted)
        if parsed:
            origins.add(parsed)
    return origins


def origin_allowed(request: HttpRequest) -> bool:
    """True when the request has no Origin header, or one that equals the
    site's own origin or a CSRF_TRUSTED_ORIGINS entry exactly: scheme, host
    and port (`http://localhost:9999` and `https://localhost` are other
    origins than `http://localhost`)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parsed = normalized_origin(origin)
    return parsed is not None and parsed in allowed_origins(request)


def csrf_failure_reason(request: HttpRequest) -> str | None:
    """The reason a session-authenticated request fails CSRF, or None: an
    Origin other than the site's own (compared exactly), or a missing or wrong
    token (Django's check, which also checks the Referer over HTTPS)."""
    if not origin_allowed(request):
        return "CSRF check failed: the request comes from another origin."
    check = CsrfViewMiddleware(lambda r: None)
    check.process_request(request)
    response = check.process_view(request, lambda r: None, (), {})
    if response is None:
        return None
    return "CSRF check failed: send the X-CSRFToken header with the session's token"


def key_fingerprint(raw: str) -> str:
    """A stable, non-secret name for a raw key (for rate-limit buckets): the
    start of its sha256, which is what the database stores anyway."""
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def limit_subject(user, raw_key: str = "") -> str:
    """Whose budget a request spends: the user's, across all of their keys,
    sessions and sockets; with API_RATE_LIMIT_PER_KEY each key has its own."""
    if raw_key and settings.API_RATE_LIMIT_PER_KEY:
        return f"key:{key_fingerprint(raw_key)}"
    return f"user:{user.pk}"

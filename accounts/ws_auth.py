"""Websocket authentication: the browser's session, or an API key.

Browsers authenticate with their session cookie, so a cookie handshake must
come from the site itself: its `Origin` is compared exactly (scheme, host and
port) with the site's own origin (the handshake's scheme and `Host`, which
must be one of ALLOWED_HOSTS) and with CSRF_TRUSTED_ORIGINS, the same rule
Django's CSRF check applies to forms. That stops cross-site websocket
hijacking. Programs send `Authorization: Bearer <key>`; no cookie is involved
there, so the origin check does not apply to them.

A refused handshake is *accepted and then closed* with a close code, because
that is what every client can observe: a handshake answered with HTTP 403
reaches browser code only as close code 1006, indistinguishable from a
network error. Codes: 4401 (no valid session or API key; also sent later
when the key is revoked or the session logs out), 4403 (a cookie handshake
from another origin). Nothing is read from a refused socket.
"""

from __future__ import annotations

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async

from accounts.auth import normalized_origin

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403

_DEFAULT_PORTS = {"http": 80, "https": 443}


def header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def bearer_token(scope) -> str:
    text = header(scope, b"authorization").strip()
    if text.lower().startswith("bearer "):
        return text[7:].strip()
    return ""


# ---- origins --------------------------------------------------------------------------


def _is_secure(scope) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        name, value = proxy
        wanted = name.removeprefix("HTTP_").replace("_", "-").lower().encode()
        return header(scope, wanted).split(",")[0].strip() == value
    return False


def own_origin(scope) -> tuple[str, str, int] | None:
    """The site's own origin as this handshake addresses it: its scheme and
    its `Host` header, when that host is one of ALLOWED_HOSTS."""
    host = header(scope, b"host").strip()
    if not host:
        return None
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]
    if not domain or not validate_host(domain, allowed):
        return None
    scheme = "https" if _is_secure(scope) else "http"
    return normalized_origin(f"{scheme}://{host}")


def origin_allowed(scope) -> bool:
    """Whether the handshake's `Origin` is exactly the site's own origin or
    one of CSRF_TRUSTED_ORIGINS (whose host may start with `*.`, as in
    Django's CSRF check). A missing or malformed Origin is refused."""
    origin = normalized_origin(header(scope, b"origin"))
    if origin is None:
        return False
    if origin == own_origin(scope):
        return True
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        wildcard = "://*." in trusted
        parsed = normalized_origin(trusted.replace("://*.", "://", 1))
        if parsed is None:
            continue
        scheme, host, port = parsed
        if (origin[0], origin[2]) != (scheme, port):
            continue
        if origin[1] == host or (wildcard and is_same_domain(origin[1], "." + host)):
            return True
    return False


# ---- refusing ---------------------------------------------------------------------------


async def refuse(receive, send, code: int) -> None:
    """Complete the handshake, then close with `code`, so that the client
    (a browser too) sees why. Nothing the client sends is read."""
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code})


# ---- the stacks ---------------------------------------------------------------------------


@database_sync_to_async
def _key_for(raw: str):
    """(user, key id) of an active raw key, or (None, None)."""
    from accounts.models import ApiKey

    key = ApiKey.lookup(raw)
    return (key.user, key.pk) if key else (None, None)


class ApiKeyAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        user, key_id = await _key_for(bearer_token(scope))
        if user is None:
            # A wrong key is refused outright, never downgraded to anonymous.
            return await refuse(receive, send, CLOSE_UNAUTHENTICATED)
        scope = dict(scope, user=user, auth="api_key", api_key_id=key_id)
        return await self.inner(scope, receive, send)


class _RequireUser:
    """After the session middleware: refuse a handshake without a logged-in user."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        user = scope.get("user")
        if user is None or not user.is_authenticated:
            return await refuse(receive, send, CLOSE_UNAUTHENTICATED)
        return await self.inner(dict(scope, auth="session"), receive, send)


class WebsocketAuthStack:
    """Session auth behind the exact origin check for browsers; API key auth
    for programs. Refusals: 4403 for another origin, 4401 without a valid
    session or key."""

    def __init__(self, inner):
        self.session = AuthMiddlewareStack(_RequireUser(inner))
        self.program = ApiKeyAuthMiddleware(inner)

    async def __call__(self, scope, receive, send):
        if bearer_token(scope):
            return await self.program(scope, receive, send)
        if not origin_allowed(scope):
            return await refuse(receive, send, CLOSE_FORBIDDEN_ORIGIN)
        return await self.session(scope, receive, send)

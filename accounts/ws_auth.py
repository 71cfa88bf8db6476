"""Websocket authentication: the browser's session, or an API key.

Browsers authenticate with their session cookie, so the handshake must come
from one of ALLOWED_HOSTS (AllowedHostsOriginValidator stops cross-site
websocket hijacking). Programs send `Authorization: Bearer <key>`; a cookie is
not involved there, so the origin check does not apply to them.
"""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.security.websocket import AllowedHostsOriginValidator


def bearer_token(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text.lower().startswith("bearer "):
                return text[7:].strip()
    return ""


@database_sync_to_async
def _user_for_key(raw: str):
    from accounts.models import ApiKey

    return ApiKey.authenticate(raw)


class ApiKeyAuthMiddleware:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        raw = bearer_token(scope)
        user = await _user_for_key(raw) if raw else None
        if raw and user is None:
            # A wrong key is refused outright, never downgraded to anonymous.
            await send({"type": "websocket.close", "code": 4401})
            return None
        scope = dict(scope, user=user, auth="api_key")
        return await self.inner(scope, receive, send)


class WebsocketAuthStack:
    """Session auth behind the origin check for browsers; API key auth for programs."""

    def __init__(self, inner):
        self.browser = AllowedHostsOriginValidator(AuthMiddlewareStack(inner))
        self.program = ApiKeyAuthMiddleware(inner)

    async def __call__(self, scope, receive, send):
        if bearer_token(scope):
            return await self.program(scope, receive, send)
        return await self.browser(scope, receive, send)

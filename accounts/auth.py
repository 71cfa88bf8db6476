"""Authentication for the HTTP APIs: an API key (`Authorization: Bearer`) or
the browser's session.

CSRF: a key-authenticated request carries no cookie, so it is exempt; a
session-authenticated one is checked exactly like a form post. Errors are JSON
in the shape of the API that was called (ours or OpenAI's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import wraps

from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from asgiref.sync import iscoroutinefunction, sync_to_async

from accounts.models import ApiKey


def json_error(status: int, code: str, message: str, **extra) -> JsonResponse:
    """BreezeWeb's own API error body: {"error": {"code", "message", ...}}."""
    return JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)


OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_body(status: int, code: str, message: str, *, type_: str = "", param=None) -> dict:
    """The `{"error": {...}}` object in OpenAI's shape (also sent inside SSE streams)."""
    default_type = OPENAI_ERROR_TYPES.get(status, "api_error")
    return {
        "error": {"message": message, "type": type_ or default_type, "param": param, "code": code}
    }


def openai_error(
    status: int, code: str, message: str, *, type_: str = "", param=None, retry_after=None
) -> JsonResponse:
    """An error body in OpenAI's shape, for /v1/* endpoints."""
    response = JsonResponse(
        openai_error_body(status, code, message, type_=type_, param=param), status=status
    )
    if retry_after is not None:
        response["Retry-After"] = str(max(1, int(retry_after)))
    return response


def bearer_key(request: HttpRequest) -> str:
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return ""


def _csrf_failure(request: HttpRequest) -> str | None:
    """The reason a session-authenticated request fails CSRF, or None."""
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


def api_view(*, error: Callable[..., JsonResponse] = json_error):
    """Decorate a view of the HTTP API: sets `request.user` from a valid API key
    (and `request.api_key_auth = True`) or requires a logged-in session.
    `request.client_id` names the caller for limits: `key:<fingerprint>` or
    `user:<id>`. Works on sync and async views (an async view gets an async
    wrapper: the key lookup runs in a thread, the session user via `auser()`)."""

    def decorator(view):
        if iscoroutinefunction(view):
            return _async_api_view(view, error)

        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args, **kwargs):
            raw = bearer_key(request)
            if raw:
                user = ApiKey.authenticate(raw)
                if user is None:
                    return error(401, "invalid_api_key", "Invalid or revoked API key.")
                request.user = user
                request.api_key_auth = True
                request.client_id = f"key:{key_fingerprint(raw)}"
            elif request.user.is_authenticated:
                request.api_key_auth = False
                request.client_id = f"user:{request.user.pk}"
                if request.method not in ("GET", "HEAD", "OPTIONS"):
                    reason = _csrf_failure(request)
                    if reason:
                        return error(403, "csrf_failed", reason)
            else:
                return error(
                    401, "not_authenticated", "Send `Authorization: Bearer <API key>` or log in."
                )
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def _async_api_view(view, error: Callable[..., JsonResponse]):
    @csrf_exempt
    @wraps(view)
    async def wrapper(request: HttpRequest, *args, **kwargs):
        raw = bearer_key(request)
        if raw:
            user = await sync_to_async(ApiKey.authenticate)(raw)
            if user is None:
                return error(401, "invalid_api_key", "Invalid or revoked API key.")
            request.user = user
            request.api_key_auth = True
            request.client_id = f"key:{key_fingerprint(raw)}"
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return error(
                    401, "not_authenticated", "Send `Authorization: Bearer <API key>` or log in."
                )
            request.user = user
            request.api_key_auth = False
            request.client_id = f"user:{user.pk}"
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                reason = _csrf_failure(request)
                if reason:
                    return error(403, "csrf_failed", reason)
        return await view(request, *args, **kwargs)

    return wrapper

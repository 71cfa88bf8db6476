"""Authentication for the HTTP APIs: an API key (`Authorization: Bearer`) or
the browser's session.

CSRF: a key-authenticated request carries no cookie, so it is exempt; a
session-authenticated one is checked exactly like a form post. Errors are JSON
in the shape of the API that was called (ours or OpenAI's).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from breezeweb.models import ApiKey


def json_error(status: int, code: str, message: str, **extra) -> JsonResponse:
    """BreezeWeb's own API error body: {"error": {"code", "message", ...}}."""
    return JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)


def openai_error(status: int, code: str, message: str, *, type_: str = "", param=None):
    """An error body in OpenAI's shape, for /v1/* endpoints."""
    default_type = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "api_error")
    body = {"message": message, "type": type_ or default_type, "param": param, "code": code}
    return JsonResponse({"error": body}, status=status)


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


def api_view(*, error: Callable[..., JsonResponse] = json_error):
    """Decorate a view of the HTTP API: sets `request.user` from a valid API key
    (and `request.api_key_auth = True`) or requires a logged-in session."""

    def decorator(view):
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
            elif request.user.is_authenticated:
                request.api_key_auth = False
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

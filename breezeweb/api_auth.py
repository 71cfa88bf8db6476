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
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.views.decorators.csrf import csrf_exempt

from asgiref.sync import iscoroutinefunction, sync_to_async

from breezeweb import ratelimit
from breezeweb.api_input import InputError
from breezeweb.models import ApiKey


def json_error(
    status: int, code: str, message: str, *, retry_after=None, param=None, **extra
) -> JsonResponse:
    """BreezeWeb's own API error body: {"error": {"code", "message", ...}}
    (`param` names the offending field when there is one)."""
    if param:
        extra["param"] = param
    response = JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)
    if retry_after is not None:
        response["Retry-After"] = str(max(1, int(retry_after)))
    return response


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


def _normalized_origin(origin: str) -> tuple[str, str, int] | None:
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
        own = _normalized_origin(f"{scheme}://{request.get_host()}")
    except DisallowedHost:
        own = None
    if own:
        origins.add(own)
    for trusted in settings.CSRF_TRUSTED_ORIGINS:
        parsed = _normalized_origin(trusted)
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
    parsed = _normalized_origin(origin)
    return parsed is not None and parsed in allowed_origins(request)


def _csrf_failure(request: HttpRequest) -> str | None:
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


def rate_limited(error: Callable[..., JsonResponse], decision, per: str) -> JsonResponse:
    return error(
        429,
        "rate_limit_exceeded",
        f"Too many requests: at most {decision.limit} per minute for this {per}. "
        f"Try again in {decision.retry_after} s.",
        retry_after=decision.retry_after,
    )


def _subject_name() -> str:
    return "key" if settings.API_RATE_LIMIT_PER_KEY else "user"


def _input_error(error: Callable[..., JsonResponse], exc: InputError) -> JsonResponse:
    return error(exc.status, exc.code, exc.message, param=exc.param)


def api_view(*, error: Callable[..., JsonResponse] = json_error, limit: str | None = None):
    """Decorate a view of the HTTP API: sets `request.user` from a valid API key
    (and `request.api_key_auth = True`) or requires a logged-in session.
    `request.client_id` names whose limits the request spends (`limit_subject`).
    With `limit` (the name of a requests-per-minute setting) the request is
    counted against it first: 429 `rate_limit_exceeded` with Retry-After.
    An `InputError` raised by the view becomes its 4xx in the API's shape.
    Works on sync and async views (an async view gets an async wrapper: the
    key lookup runs in a thread, the session user via `auser()`)."""

    def decorator(view):
        if iscoroutinefunction(view):
            return _async_api_view(view, error, limit)

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
            request.client_id = limit_subject(request.user, raw)
            if limit:
                decision = ratelimit.hit(f"api:{request.client_id}", getattr(settings, limit), 60)
                if not decision.allowed:
                    return rate_limited(error, decision, _subject_name())
            try:
                return view(request, *args, **kwargs)
            except InputError as exc:
                return _input_error(error, exc)

        return wrapper

    return decorator


def _async_api_view(view, error: Callable[..., JsonResponse], limit: str | None):
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
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return error(
                    401, "not_authenticated", "Send `Authorization: Bearer <API key>` or log in."
                )
            request.user = user
            request.api_key_auth = False
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                reason = _csrf_failure(request)
                if reason:
                    return error(403, "csrf_failed", reason)
        request.client_id = limit_subject(request.user, raw)
        if limit:
            decision = await ratelimit.ahit(
                f"api:{request.client_id}", getattr(settings, limit), 60
            )
            if not decision.allowed:
                return rate_limited(error, decision, _subject_name())
        try:
            return await view(request, *args, **kwargs)
        except InputError as exc:
            return _input_error(error, exc)

    return wrapper
